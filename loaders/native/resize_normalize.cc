// shardline's DALI CPU operator: bilinear resize + horizontal flip + normalize + layout, in one pass.
//
// Why it exists: on CPU, DALI's resize (separable resampling through a float intermediate)
// costs about 1 ms per ImageNet crop -> 224x224, as much as decoding the JPEG, and
// crop_mirror_normalize then reads the image again. This operator samples each output pixel
// straight from the decoded uint8 crop, so the train pipeline's post-decode work drops to a
// fraction of that. Resampling is the same as fn.resize(interp_type=INTERP_LINEAR,
// antialias=False), which the CPU train pipeline used before: pixel-centre aligned
// (src = (dst + 0.5) * in / out - 0.5), edges clamped. The GPU graph keeps DALI's own
// operators; this one is CPU only.
//
// Built and loaded by loaders/dali_plugin.py (compiled on first use against the installed
// DALI's headers).

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "dali/core/float16.h"
#include "dali/pipeline/operator/operator.h"

namespace shardline {

using ::dali::CPUBackend;
using ::dali::DALIDataType;
using ::dali::Workspace;

struct Tap {
  int i0, i1;  // source indices (already clamped)
  float w1;    // weight of i1; i0 gets 1 - w1
};

// Pixel-centre aligned linear taps for `out` samples over `in` source samples.
static void MakeTaps(std::vector<Tap> &taps, int in, int out) {
  taps.resize(out);
  const double scale = static_cast<double>(in) / out;
  for (int o = 0; o < out; o++) {
    double f = (o + 0.5) * scale - 0.5;
    f = std::clamp(f, 0.0, static_cast<double>(in - 1));
    int i0 = static_cast<int>(f);
    int i1 = std::min(i0 + 1, in - 1);
    taps[o] = {i0, i1, static_cast<float>(f - i0)};
  }
}

constexpr int kChannels = 3;  // the decoders' RGB output

template <typename Out, bool kCHW>
static void ResizeNormalizeSample(const uint8_t *__restrict in, int in_h, int in_w, Out *__restrict out, int out_h,
                                  int out_w, bool mirror, const float *mul, const float *add) {
  constexpr int C = kChannels;
  std::vector<Tap> xtaps, ytaps;
  MakeTaps(xtaps, in_w, out_w);
  MakeTaps(ytaps, in_h, out_h);
  if (mirror) std::reverse(xtaps.begin(), xtaps.end());
  // Horizontal taps as (offset of the left pixel, weight of the right one); at the right edge
  // the two coincide, so the weight becomes 0 and the padding pixel after the row is never used.
  std::vector<int> x_off(out_w);
  std::vector<float> x_w(out_w);
  for (int x = 0; x < out_w; x++) {
    x_off[x] = xtaps[x].i0 * C;
    x_w[x] = xtaps[x].i1 == xtaps[x].i0 ? 0.0f : xtaps[x].w1;
  }
  const float m[C] = {mul[0], mul[1], mul[2]}, d[C] = {add[0], add[1], add[2]};
  // Vertical pass first: blending two whole source rows is contiguous (the compiler
  // vectorizes it) and leaves only out_w gathers per output row for the horizontal pass.
  const int in_row = in_w * C;
  std::vector<float> row(in_row + C, 0.0f);
  float *__restrict r = row.data();
  const size_t plane = static_cast<size_t>(out_h) * out_w;
  for (int y = 0; y < out_h; y++) {
    const Tap t = ytaps[y];
    const uint8_t *__restrict a = in + static_cast<size_t>(t.i0) * in_row;
    const uint8_t *__restrict b = in + static_cast<size_t>(t.i1) * in_row;
    const float wy = t.w1;
    for (int k = 0; k < in_row; k++) r[k] = a[k] + wy * (static_cast<float>(b[k]) - a[k]);
    if (kCHW) {  // element (c, y, x) at c * plane + y * out_w + x
      Out *__restrict o = out + static_cast<size_t>(y) * out_w;
      for (int x = 0; x < out_w; x++) {
        const float *p = r + x_off[x];
        const float w = x_w[x];
        for (int c = 0; c < C; c++) o[c * plane + x] = static_cast<Out>((p[c] + w * (p[C + c] - p[c])) * m[c] + d[c]);
      }
    } else {  // element (y, x, c) at (y * out_w + x) * C + c
      Out *__restrict o = out + static_cast<size_t>(y) * out_w * C;
      for (int x = 0; x < out_w; x++) {
        const float *p = r + x_off[x];
        const float w = x_w[x];
        for (int c = 0; c < C; c++) o[x * C + c] = static_cast<Out>((p[c] + w * (p[C + c] - p[c])) * m[c] + d[c]);
      }
    }
  }
}

template <typename Out>
static void ResizeNormalizeSample(const uint8_t *in, int in_h, int in_w, Out *out, int out_h, int out_w, bool mirror,
                                  bool chw, const float *mul, const float *add) {
  if (chw)
    ResizeNormalizeSample<Out, true>(in, in_h, in_w, out, out_h, out_w, mirror, mul, add);
  else
    ResizeNormalizeSample<Out, false>(in, in_h, in_w, out, out_h, out_w, mirror, mul, add);
}

class ResizeNormalize : public ::dali::Operator<CPUBackend> {
 public:
  explicit ResizeNormalize(const ::dali::OpSpec &spec)
      : ::dali::Operator<CPUBackend>(spec),
        size_(spec.GetRepeatedArgument<int>("size")),
        dtype_(spec.GetArgument<DALIDataType>("dtype")),
        layout_(spec.GetArgument<std::string>("output_layout")) {
    const auto mean = spec.GetRepeatedArgument<float>("mean"), stdev = spec.GetRepeatedArgument<float>("std");
    DALI_ENFORCE(size_.size() == 2 && size_[0] > 0 && size_[1] > 0, "size must be [height, width], both > 0");
    DALI_ENFORCE(mean.size() == kChannels && stdev.size() == kChannels, "mean and std need 3 values (R, G, B)");
    DALI_ENFORCE(dtype_ == DALI_FLOAT || dtype_ == DALI_FLOAT16, "dtype must be FLOAT or FLOAT16");
    DALI_ENFORCE(layout_ == "CHW" || layout_ == "HWC", "output_layout must be \"CHW\" or \"HWC\"");
    for (int c = 0; c < kChannels; c++) {  // (x - mean) / std as x * mul + add
      DALI_ENFORCE(stdev[c] != 0.0f, "std must not be 0");
      mul_[c] = 1.0f / stdev[c];
      add_[c] = -mean[c] / stdev[c];
    }
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const Workspace &ws) override {
    const auto &input = ws.Input<CPUBackend>(0);
    DALI_ENFORCE(input.type() == DALI_UINT8, "input must be uint8 images");
    const int n = input.num_samples();
    ::dali::TensorListShape<3> shape(n);
    for (int i = 0; i < n; i++) {
      auto in = input.tensor_shape(i);
      DALI_ENFORCE(in.size() == 3 && in[2] == kChannels,
                   ::dali::make_string("sample ", i, ": expected an RGB HWC image, got shape ", in));
      DALI_ENFORCE(in[0] > 0 && in[1] > 0, ::dali::make_string("sample ", i, ": empty image"));
      if (layout_ == "CHW")
        shape.set_tensor_shape(i, {kChannels, size_[0], size_[1]});
      else
        shape.set_tensor_shape(i, {size_[0], size_[1], kChannels});
    }
    output_desc.resize(1);
    output_desc[0] = {shape, dtype_};
    return true;
  }

  void RunImpl(Workspace &ws) override {
    const auto &input = ws.Input<CPUBackend>(0);
    auto &output = ws.Output<CPUBackend>(0);
    output.SetLayout(layout_);
    auto &tp = ws.GetThreadPool();
    const int n = input.num_samples();
    const bool chw = layout_ == "CHW";
    for (int i = 0; i < n; i++) {
      const auto in = input.tensor_shape(i);
      const int in_h = in[0], in_w = in[1];
      const bool mirror = spec_.GetArgument<int>("mirror", &ws, i) != 0;
      const uint8_t *src = input.tensor<uint8_t>(i);
      void *dst = output.raw_mutable_tensor(i);
      tp.AddWork(
          [=, this](int) {
            if (dtype_ == DALI_FLOAT)
              ResizeNormalizeSample(src, in_h, in_w, static_cast<float *>(dst), size_[0], size_[1], mirror,
                                    chw, mul_, add_);
            else
              ResizeNormalizeSample(src, in_h, in_w, static_cast<::dali::float16 *>(dst), size_[0],
                                    size_[1], mirror, chw, mul_, add_);
          },
          static_cast<int64_t>(in_h) * in_w);
    }
    tp.RunAll();
  }

 private:
  std::vector<int> size_;
  float mul_[kChannels], add_[kChannels];
  DALIDataType dtype_;
  std::string layout_;
};

}  // namespace shardline

DALI_REGISTER_OPERATOR(ShardlineResizeNormalize, ::shardline::ResizeNormalize, ::dali::CPU);

DALI_SCHEMA(ShardlineResizeNormalize)
    .DocStr(R"(Bilinear resize (pixel-centre aligned, no antialiasing) of uint8 HWC images to `size`,
optional horizontal flip, then (x - mean) / std, written as `dtype` in `output_layout`, in one pass.)")
    .NumInput(1)
    .NumOutput(1)
    .AddArg("size", "Output [height, width].", DALI_INT_VEC)
    .AddArg("mean", "Per-channel mean, in pixel units (0-255).", DALI_FLOAT_VEC)
    .AddArg("std", "Per-channel standard deviation, in pixel units.", DALI_FLOAT_VEC)
    .AddOptionalTypeArg("dtype", "Output type: FLOAT or FLOAT16.", DALI_FLOAT)
    .AddOptionalArg("output_layout", "CHW or HWC.", "CHW")
    .AddOptionalArg("mirror", "Flip horizontally when nonzero (per sample).", 0, true);

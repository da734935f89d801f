"""train: `python -m train`, a DDP image-classification trainer fed by shardline shards.

    config.py       command line, presets, checks before any work
    models.py       torchvision names / package.module:Class, small-input stem, collapse check
    recipe.py       optimizer groups, lr scaling, warmup + cosine, label smoothing, mixup/cutmix, EMA
    engine.py       the training step loop (AMP, accumulation, clipping, non-finite guard), exact eval
    distributed.py  torchrun environment, process group, metric all-reduce
    checkpoint.py   atomic last.pt / best.pt, RNG states, resume
    report.py       progress bar, TensorBoard, metrics.jsonl, summary.json
    run.py          the run, top to bottom
    throughput.py   `python -m train.throughput`: training steps/s from real against synthetic data

train/ reads data only through loaders.make_loader (DESIGN.md section 6).
"""

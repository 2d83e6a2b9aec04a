"""The paper's four metrics on transformers alone, each loading the official checkpoint:
PickScore, HPSv2 (v2.0 / v2.1), ImageReward and the LAION Aesthetic predictor.

Every scorer is a small class: `Scorer(..., device=, dtype=, batch_size=)` then
`scorer.score(images: list[PIL.Image], prompts: list[str]) -> list[float]` (higher is better).
`load_scorer(name, **locations)` builds one by metric name.

The toy world's judges (scorers/toy.py, for examples/toy/) are metrics too: `toy_adherence` and
`toy_attributes` score each image; `toy_fd` is a distribution metric (`kind = "distribution"`): one value
per model from all its images, `scorer.distribution(images, prompts) -> float` (lower is better).
"""

METRICS = ("pickscore", "hpsv2", "imagereward", "aesthetic")  # the paper's four, the default of evaluate.py
TOY_METRICS = ("toy_adherence", "toy_attributes", "toy_fd")
ALL_METRICS = METRICS + TOY_METRICS


def load_scorer(name, device="cpu", dtype=None, batch_size=16, **locations):
    """`locations` holds the checkpoint flags of evaluate.py (pickscore_model, hps_checkpoint, ...); missing
    ones take the official Hub defaults."""
    import torch

    dtype = dtype or torch.float32
    kw = {k: v for k, v in locations.items() if v is not None}
    if name == "pickscore":
        from .pickscore import PickScore

        return PickScore(
            model=kw.get("pickscore_model", PickScore.MODEL),
            processor=kw.get("pickscore_processor", PickScore.PROCESSOR),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
    if name == "hpsv2":
        from .hps import HPSv2

        return HPSv2(
            checkpoint=kw.get("hps_checkpoint"),
            version=kw.get("hps_version", "v2.1"),
            processor=kw.get("hps_processor", HPSv2.PROCESSOR),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
    if name == "imagereward":
        from .imagereward import ImageReward

        return ImageReward(
            checkpoint=kw.get("imagereward_checkpoint", ImageReward.CHECKPOINT),
            tokenizer=kw.get("imagereward_tokenizer", ImageReward.TOKENIZER),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
    if name == "aesthetic":
        from .aesthetic import Aesthetic

        return Aesthetic(
            head=kw.get("aesthetic_head", Aesthetic.HEAD),
            clip_model=kw.get("aesthetic_clip_model", Aesthetic.CLIP_MODEL),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
    if name in TOY_METRICS:
        from .toy import ToyAdherence, ToyFD

        if not kw.get("toy_judge"):
            raise ValueError(f"{name} needs --toy_judge (the judge folder built by examples/toy/build_base.py)")
        if name == "toy_fd":
            return ToyFD(kw["toy_judge"])
        return ToyAdherence(kw["toy_judge"], strict=name == "toy_adherence")
    raise ValueError(f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}")

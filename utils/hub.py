"""Model cards and Hub pushes. The Hub address comes from HF_ENDPOINT, the token from the argument,
else HF_TOKEN or the cached login; the token is never written anywhere."""

from pathlib import Path

# Never uploaded with a model: resumable training state, logs, caches and SPIN samples stay local
# (fnmatch patterns: "*" also matches "/").
PUSH_IGNORE = ["checkpoint-*", "logs/*", "latent_cache/*", "synthetic/*", "*.partial/*", "spin_state.json"]


def write_model_card(output_dir, *, base_model, dataset, title, description, tags, hyperparameters,
                     image="validation_grid.png", metrics=None):
    """README.md with Hub metadata (base_model, datasets, tags, license) and a hyperparameter table."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base_model,
        datasets=[dataset] if dataset and not Path(dataset).exists() else None,
        tags=["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", *tags],
        license="creativeml-openrail-m",
        library_name="diffusers",
        pipeline_tag="text-to-image",
    )
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hyperparameters.items())
    metric_rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in (metrics or {}).items())
    image_md = f"\n![samples]({image})\n" if image and (Path(output_dir) / image).exists() else ""
    dataset_line = f"Trained on `{dataset}`." if dataset else ""
    content = f"""---
{data.to_yaml()}
---

# {title}

{description}

Base model: `{base_model}`. {dataset_line}
{image_md}
## Hyperparameters

| name | value |
|---|---|
{rows}
"""
    if metric_rows:
        content += f"\n## Final metrics\n\n| metric | value |\n|---|---|\n{metric_rows}\n"
    card = ModelCard(content)
    card.save(Path(output_dir) / "README.md")
    return card


def push_folder(folder, repo_id, token=None, private=False, commit_message="Upload model", revision=None,
                ignore_patterns=PUSH_IGNORE, repo_type="model"):
    """Create `repo_id` if needed and upload `folder` (without checkpoints/logs). Returns the full repo id."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type=repo_type).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, commit_message=commit_message,
                  ignore_patterns=ignore_patterns, revision=revision, repo_type=repo_type)
    return repo_id


def resolve_file(location, default_filename=None, revision=None, token=None):
    """A local path for `location`: a local file, a local folder (+ `default_filename`), or a Hub repo id with
    an optional `:filename` (`xswu/HPSv2:HPS_v2.1_compressed.pt`), downloaded through the Hub cache."""
    from huggingface_hub import hf_hub_download

    path = Path(location).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if default_filename is None or not (path / default_filename).is_file():
            raise FileNotFoundError(f"{location}: no {default_filename} in this folder")
        return path / default_filename
    repo_id, _, filename = location.partition(":")
    filename = filename or default_filename
    if not filename:
        raise FileNotFoundError(f"{location}: not a local file; as a Hub repo it needs ':filename'")
    return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))

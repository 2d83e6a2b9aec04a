"""Model cards and Hub pushes that survive a flaky Hub. The Hub address comes from HF_ENDPOINT, the token from
the argument, else HF_TOKEN or the cached login; the token is never written anywhere.

Every write (repo creation, upload, tags) goes through `with_retries`: bounded exponential backoff on 429, 5xx
and dropped connections, honouring `Retry-After`, never retrying 401/403/404 (they need the user, not time).
SPIN pushes each iteration in the background (`BackgroundPushes`, `push_unpushed`) with its card
(`write_iteration_card`).
Needs no sibling module: it can be copied on its own.
"""

import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class HubError(RuntimeError):
    """A Hub problem the user has to fix (token, repo id, permission), or a write that kept failing."""


def http_status(err):
    """The HTTP status of a Hub client error, or None (e.g. a dropped connection)."""
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def is_transient(err):
    """Worth retrying: 429, 408, 5xx, or a network failure (connection refused or dropped, timeout)."""
    status = http_status(err)
    if status is not None:
        return status in TRANSIENT_STATUS or status >= 500
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if type(err).__module__.startswith("hf_xet"):  # Xet storage transfers (the Hub's default for large files)
        return True
    # huggingface_hub's HTTP client (httpx2 / httpx) raises its own network errors: match them by name
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"TransportError", "NetworkError", "TimeoutException", "RemoteProtocolError", "ConnectError"})


def retry_after(err):
    """Seconds from the `Retry-After` header of a failed response (delay-seconds form), or None."""
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def with_retries(
    fn,
    *args,
    what="Hub request",
    max_time=600.0,
    base_delay=2.0,
    max_delay=60.0,
    deadline=None,
    sleep=time.sleep,
    **kwargs,
):
    """`fn(*args, **kwargs)`, retried on transient failures (`is_transient`) with exponential backoff from
    `base_delay` up to `max_delay` seconds, or the server's `Retry-After`, until `max_time` seconds have passed
    (or the monotonic `deadline`). The last error is raised, with the attempts noted in its log lines."""
    deadline = deadline if deadline is not None else time.monotonic() + max_time
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not is_transient(err):
                raise
            attempt += 1
            delay = retry_after(err)
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) if delay is None else max(delay, 0.5)
            left = deadline - time.monotonic()
            if delay > left:
                logger.warning(
                    f"{what} failed ({describe(err)}); giving up after {attempt} attempt(s): the retry "
                    f"time limit is spent"
                )
                raise
            logger.warning(f"{what} failed ({describe(err)}); retry {attempt} in {delay:.0f}s")
            sleep(delay)


def describe(err):
    """A one-line account of a Hub failure, without the token."""
    status = http_status(err)
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"HTTP {status}: {text}" if status is not None else f"{type(err).__name__}: {text}"


# Never uploaded with a model: resumable training state, logs, caches and SPIN samples stay local
# (fnmatch patterns: "*" also matches "/").
PUSH_IGNORE = [
    "checkpoint-*",
    "logs/*",
    "latent_cache/*",
    "synthetic/*",
    "*.partial/*",
    "spin_state.json",
    "sft_state.json",
]


def write_model_card(
    output_dir,
    *,
    base_model,
    dataset,
    title,
    description,
    tags,
    hyperparameters,
    image="validation_grid.png",
    metrics=None,
):
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


def push_folder(
    folder,
    repo_id,
    *,
    token=None,
    private=False,
    commit_message="Upload model",
    revision=None,
    ignore_patterns=PUSH_IGNORE,
    repo_type="model",
    max_time=600.0,
    deadline=None,
):
    """Create `repo_id` if needed and upload `folder` (without checkpoints/logs), each retried on transient
    failures for up to `max_time` seconds in all. Returns the full repo id. An upload is one commit: a retry
    after a failed commit re-sends only what the Hub does not already hold. `deadline` (monotonic) replaces
    `max_time` to share one budget between several calls."""
    from huggingface_hub import create_repo, upload_folder

    deadline = deadline if deadline is not None else time.monotonic() + max_time
    repo_id = with_retries(
        create_repo,
        repo_id,
        token=token,
        private=private,
        exist_ok=True,
        repo_type=repo_type,
        what=f"creating {repo_id}",
        deadline=deadline,
    ).repo_id
    with_retries(
        upload_folder,
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message,
        ignore_patterns=ignore_patterns,
        revision=revision,
        repo_type=repo_type,
        what=f"uploading {folder} to {repo_id}",
        deadline=deadline,
    )
    return repo_id


def move_tag(repo_id, tag, token=None, max_time=600.0, deadline=None):
    """Point `tag` at the repo's newest commit (delete it first if it exists), retried like `push_folder`."""
    from huggingface_hub import create_tag, delete_tag

    deadline = deadline if deadline is not None else time.monotonic() + max_time
    try:
        with_retries(
            delete_tag, repo_id, tag=tag, token=token, what=f"deleting tag {tag} of {repo_id}", deadline=deadline
        )
    except Exception as err:
        if http_status(err) != 404:  # 404: no such tag yet
            raise
    with_retries(create_tag, repo_id, tag=tag, token=token, what=f"tagging {repo_id} {tag}", deadline=deadline)


def hub_user(token=None, max_time=600.0, repo_id=None):
    """The account name behind the token, checked now so that a push cannot fail on it after hours of training;
    with `repo_id`, also that its namespace is that account or one of its organisations. Raises HubError saying
    what to fix: no token, a refused token, a foreign namespace, or a Hub that cannot be reached."""
    from huggingface_hub import constants, whoami
    from huggingface_hub.errors import LocalTokenNotFoundError

    try:
        me = with_retries(whoami, token=token, what="checking the Hub token", max_time=max_time)
        namespaces = [me["name"]] + [org.get("name") for org in me.get("orgs") or []]
        if repo_id and "/" in repo_id and repo_id.split("/")[0] not in namespaces:
            raise HubError(
                f"--hub_model_id {repo_id}: the token's account ({me['name']}) cannot create repos under "
                f"{repo_id.split('/')[0]!r}; use one of {namespaces}"
            )
        return me["name"]
    except HubError:
        raise
    except LocalTokenNotFoundError as err:
        raise HubError(
            "--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN, or pass --hub_token"
        ) from err
    except Exception as err:
        if http_status(err) in (401, 403):
            raise HubError(
                f"the Hub refused the token (HTTP {http_status(err)}): check --hub_token, HF_TOKEN or "
                f"the cached login (`hf auth login`)"
            ) from err
        raise HubError(f"could not check the Hub token at {constants.ENDPOINT}: {describe(err)}") from err


def validate_repo_name(name, flag="--hub_model_id"):
    """Raise HubError when `name` (namespace/name or name) is not a valid Hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise HubError(f"{flag} {name!r} is not a valid Hub repo id: {str(err).splitlines()[0]}") from err


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


class BackgroundPushes:
    """Pushes run one at a time, in the order they were submitted, on a daemon thread, so that the next iteration
    generates and trains while the previous one uploads (a Hub outage costs retries, not GPU time). One worker:
    never two pushes to one repo at once, and commits land in order. A job handles its own errors (it records
    them); `wait` bounds how long the end of a run waits for what is left."""

    def __init__(self):
        import queue
        import threading

        self._jobs, self._idle = queue.Queue(), threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._work, name="hub-pushes", daemon=True).start()

    def submit(self, job):
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._jobs.put(job)

    def _work(self):
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception as e:  # a job records its own failures; anything else must not kill the worker
                logger.error(f"background push failed: {describe(e)}")
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def wait(self, timeout):
        """Whether every submitted push finished within `timeout` seconds."""
        return self._idle.wait(timeout)


# ----------------------------------------------------------------------------- SPIN's pushes, one per iteration


# the flags a SPIN iteration's model card lists
CARD_FLAGS = """beta sft_weight learning_rate lr_scheduler lr_warmup_steps max_train_steps train_batch_size
gradient_accumulation_steps resolution mixed_precision use_lora rank negative_source gen_num_inference_steps
gen_guidance_scale gen_scheduler gen_eta gen_prompts_per_iteration spin_objective trajectory_steps prediction_type
seed""".split()


def write_iteration_card(args, it_dir, k, hub_repo, metrics, pipeline_class, note=""):
    """Iteration k+1's model card (train_spin_diffusion.py): method, lineage (a full fine-tune's base_model is the
    previous iteration's repo), how to load it, `note` (what the metrics say), the flags, the mean metrics and the
    sample grid `validation_grid.png`."""
    method = "Diffusion-DPO" if args.negative_source == "dataset" else "SPIN-Diffusion"
    # Full fine-tunes chain: iteration k+1's base_model is iteration k's repo, so the Hub shows the lineage. A LoRA
    # applies to the start model whatever the iteration, so its base_model stays the start model (lineage in the text).
    previous = (
        f"{hub_repo}-iter{k}"
        if hub_repo and args.hub_versioning == "repos" and k > 0
        else args.pretrained_model_name_or_path
    )
    base_model = args.pretrained_model_name_or_path if args.use_lora else previous
    load = (
        f"`pipe = {pipeline_class}.from_pretrained('{args.pretrained_model_name_or_path}')` then "
        f"`pipe.load_lora_weights(...)`: the adapter is relative to the start model"
        if args.use_lora
        else f"`{pipeline_class}.from_pretrained(...)`"
    )
    write_model_card(
        it_dir,
        base_model=base_model,
        dataset=args.dataset_name,
        title=f"{method} iteration {k + 1}",
        description=f"Iteration {k + 1} of {method} (Yuan et al., NeurIPS 2024) "
        f"from `{args.pretrained_model_name_or_path}`, "
        f"trained with `train_spin_diffusion.py`. Previous iteration: `{previous}`. Load with {load}.\n\n" + note,
        tags=["spin-diffusion" if args.negative_source == "self" else "diffusion-dpo", f"iteration-{k + 1}"]
        + (["lora"] if args.use_lora else [])
        + (["spin-trajectory-objective"] if args.spin_objective == "trajectory" else []),
        hyperparameters={name: getattr(args, name) for name in CARD_FLAGS},
        metrics=metrics["mean"],
        image="validation_grid.png",
    )


def push_iteration(args, hub_repo, k, it_dir):
    """Push iteration k+1 (weights, card, metrics; its samples with --push_synthetic_dataset). Returns where it
    went. Each write is retried (utils/hub.py); the error of the last attempt is raised."""
    deadline = time.monotonic() + args.hub_retry_max_time  # one budget for all of this iteration's writes
    kw = dict(token=args.hub_token, private=args.hub_private_repo, deadline=deadline)
    message = f"SPIN-Diffusion iteration {k + 1}"
    if args.hub_versioning == "repos":
        where = push_folder(it_dir, f"{hub_repo}-iter{k + 1}", commit_message=message, **kw)
    else:
        repo = push_folder(it_dir, hub_repo, commit_message=message, **kw)
        move_tag(repo, f"iter{k + 1}", token=args.hub_token, deadline=deadline)  # a rerun moves it
        where = f"{repo}@iter{k + 1}"
    if args.push_synthetic_dataset and (it_dir / "synthetic").is_dir():
        push_folder(
            it_dir / "synthetic",
            f"{hub_repo}-iter{k + 1}-synthetic",
            repo_type="dataset",
            ignore_patterns=["*.tmp", "*.corrupt"],
            **kw,
        )
    return where


def unpushed_iterations(state):
    return [it for it in sorted(state.get("done")) if str(it) not in state.get("pushed")]


def push_unpushed(args, state, hub_repo, stop_at_failure=True):
    """Push every saved iteration that is not on the Hub yet, oldest first. A push that still fails after its
    retries is logged and recorded in spin_state.json (`push_errors`), and the run goes on: the iteration stays
    saved, and the push is tried again after the next iteration and by a rerun. Between iterations the first
    failure ends the attempt (the run submits it to `BackgroundPushes`). Returns the unpushed iterations."""
    for it in unpushed_iterations(state):
        try:
            where = push_iteration(args, hub_repo, it - 1, Path(args.output_dir) / f"iter_{it}")
        except Exception as e:
            state.update(push_errors=state.get("push_errors", {}) | {str(it): describe(e)})
            logger.error(
                f"iteration {it}: push failed ({describe(e)}); it stays saved in {args.output_dir}/iter_{it}/ "
                f"and the push is retried after the next iteration and by rerunning the same command"
            )
            if stop_at_failure or args.hub_versioning == "revisions":  # revisions: keep commits in iteration order
                break
            continue
        errors = {key: v for key, v in state.get("push_errors", {}).items() if key != str(it)}
        state.update(pushed=state.get("pushed") | {str(it): where}, push_errors=errors)
        logger.info(f"iteration {it} pushed to {where}")
    return unpushed_iterations(state)


def resolve_hub_repo(args):
    """The full repo id base (namespace/name) for pushes. Checks the token and the names of every repo the run
    will create now, not after hours of training (HubError)."""
    name = args.hub_model_id or Path(args.output_dir).resolve().name
    validate_repo_name(name)
    user = hub_user(args.hub_token, args.hub_retry_max_time, repo_id=name)  # no or refused token, foreign namespace
    repo = name if "/" in name else f"{user}/{name}"
    last = 1 if args.negative_source == "dataset" else args.num_iterations
    longest = f"{repo}-iter{last}" + ("-synthetic" if args.push_synthetic_dataset else "")
    validate_repo_name(longest if args.hub_versioning == "repos" else repo)
    return repo

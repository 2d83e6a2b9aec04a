"""The local Hub server (tests/hub_server.py) against the REAL huggingface_hub / diffusers client code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hub_server import TEST_TOKEN, TEST_USER, hub_online

pytestmark = pytest.mark.usefixtures("hub_server")


def _api(token=TEST_TOKEN):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_folder(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden": 4}))
    (folder / "sub" / "notes.txt").write_text("hello hub\n")
    (folder / "big.bin").write_bytes(os.urandom(10 * 1024 * 1024 + 12345))  # > 10 MB: goes through LFS
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(folder / "weights.safetensors"))
    return folder


def test_whoami_and_token_recorded(hub_server):
    with hub_online():
        assert _api().whoami()["name"] == TEST_USER
    assert TEST_TOKEN in hub_server.seen_tokens


def test_create_repo_records_private_and_exist_ok(hub_server):
    from huggingface_hub.errors import HfHubHTTPError

    with hub_online():
        api = _api()
        url = api.create_repo("private-repo", private=True)  # namespace defaults to the token's user
        assert url.repo_id == f"{TEST_USER}/private-repo"
        api.create_repo(f"{TEST_USER}/private-repo", exist_ok=True)
        with pytest.raises(HfHubHTTPError) as err:
            api.create_repo(f"{TEST_USER}/private-repo")
        assert err.value.response.status_code == 409
        api.create_repo(f"{TEST_USER}/public-repo")
        assert api.repo_info(f"{TEST_USER}/private-repo").private is True
        # private repos are invisible without the token, like on the Hub
        assert api.repo_exists(f"{TEST_USER}/private-repo")
        assert not _api(token=False).repo_exists(f"{TEST_USER}/private-repo")
        assert _api(token=False).repo_exists(f"{TEST_USER}/public-repo")
    assert hub_server.repo_private(f"{TEST_USER}/private-repo") is True
    assert hub_server.repo_private(f"{TEST_USER}/public-repo") is False


def test_upload_folder_snapshot_and_file_download(hub_server, model_folder, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id = f"{TEST_USER}/roundtrip"
    with hub_online():
        api = _api()
        api.create_repo(repo_id, private=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=model_folder, commit_message="add model")
        assert len(info.oid) == 40
        expected = _tree_bytes(model_folder)
        assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *expected])

        local = Path(snapshot_download(repo_id, token=TEST_TOKEN, cache_dir=tmp_path / "cache"))
        downloaded = _tree_bytes(local)
        assert downloaded.pop(".gitattributes")
        assert downloaded == expected

        one = hf_hub_download(repo_id, "sub/notes.txt", token=TEST_TOKEN, cache_dir=tmp_path / "cache2")
        assert Path(one).read_text() == "hello hub\n"
        local_dir = tmp_path / "local_dir"
        hf_hub_download(repo_id, "weights.safetensors", token=TEST_TOKEN, local_dir=local_dir)
        assert (local_dir / "weights.safetensors").read_bytes() == expected["weights.safetensors"]

        assert api.file_exists(repo_id, "big.bin") and not api.file_exists(repo_id, "nope.bin")
        lfs = {f.path: f.lfs for f in api.list_repo_tree(repo_id, recursive=True) if hasattr(f, "lfs")}
        assert lfs["big.bin"] is not None and lfs["big.bin"].size == len(expected["big.bin"])
        assert lfs["config.json"] is None
    assert hub_server.files(repo_id) == sorted([".gitattributes", *expected])
    assert hub_server.is_lfs(repo_id, "big.bin") and hub_server.is_lfs(repo_id, "weights.safetensors")
    assert hub_server.read_file(repo_id, "big.bin") == expected["big.bin"]


def test_branches_tags_and_old_revisions(hub_server, tmp_path):
    from huggingface_hub import hf_hub_download

    repo_id = f"{TEST_USER}/revisions"
    with hub_online():
        api = _api()
        api.create_repo(repo_id)
        v1 = api.upload_file(path_or_fileobj=b"version 1", path_in_repo="file.txt", repo_id=repo_id).oid
        api.create_tag(repo_id, tag="v1")
        api.create_branch(repo_id, branch="dev")
        api.create_branch(repo_id, branch="dev", exist_ok=True)
        dev = api.upload_file(path_or_fileobj=b"dev version", path_in_repo="file.txt", repo_id=repo_id, revision="dev")
        v2 = api.upload_file(path_or_fileobj=b"version 2", path_in_repo="file.txt", repo_id=repo_id).oid
        api.create_branch(repo_id, branch="from-v1", revision=v1)

        def fetch(revision):
            path = hf_hub_download(repo_id, "file.txt", revision=revision, cache_dir=tmp_path / "c", token=TEST_TOKEN)
            return Path(path).read_bytes()

        assert fetch("main") == b"version 2"
        assert fetch("v1") == b"version 1"
        assert fetch(v1) == b"version 1"  # old commit still downloadable
        assert fetch(v1[:7]) == b"version 1"
        assert fetch("dev") == b"dev version"
        assert fetch(dev.oid) == b"dev version"
        assert fetch("from-v1") == b"version 1"
        assert api.repo_info(repo_id, revision="v1").sha == v1

        refs = api.list_repo_refs(repo_id)
        assert {b.name: b.target_commit for b in refs.branches} == {
            "main": v2, "dev": dev.oid, "from-v1": v1,
        }  # fmt: skip
        assert {t.name: t.target_commit for t in refs.tags} == {"v1": v1}
        assert [c.commit_id for c in api.list_repo_commits(repo_id)][:2] == [v2, v1]
    assert hub_server.files(repo_id, revision="dev") == [".gitattributes", "file.txt"]


def test_wrong_or_missing_token_gives_401(hub_server, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = f"{TEST_USER}/auth"
    with hub_online():
        _api().create_repo(repo_id)
        _api().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
        bad = _api(token="hf_wrong_token")
        for call in (
            lambda: bad.whoami(),
            lambda: bad.create_repo(f"{TEST_USER}/never-created"),
            lambda: bad.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=repo_id),
            lambda: hf_hub_download(repo_id, "x.txt", token="hf_wrong_token", cache_dir=tmp_path / "c"),
            lambda: _api(token=False).upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=repo_id),
        ):
            with pytest.raises(HfHubHTTPError) as err:
                call()
            assert err.value.response.status_code == 401
    assert "hf_wrong_token" in hub_server.seen_tokens
    assert not hub_server.repo_exists(f"{TEST_USER}/never-created")
    assert hub_server.files(repo_id) == [".gitattributes", "x.txt"]


def test_upload_folder_ignore_and_delete_patterns(hub_server, tmp_path):
    repo_id = f"{TEST_USER}/patterns"
    folder = tmp_path / "out"
    (folder / "logs").mkdir(parents=True)
    (folder / "checkpoint-1").mkdir()
    (folder / "keep.txt").write_text("keep")
    (folder / "old.md").write_text("old")
    (folder / "logs" / "events.log").write_text("log")
    (folder / "checkpoint-1" / "optimizer.bin").write_bytes(b"\0" * 100)
    (folder / "scratch.tmp").write_text("tmp")
    with hub_online():
        api = _api()
        api.create_repo(repo_id)
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, ignore_patterns=["*.tmp", "logs/*", "checkpoint-*/**", "checkpoint-*"]
        )
        assert hub_server.files(repo_id) == [".gitattributes", "keep.txt", "old.md"]
        (folder / "old.md").unlink()
        (folder / "new.md").write_text("new")
        api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=["*.md"], delete_patterns=["*.md"])
    assert hub_server.files(repo_id) == [".gitattributes", "keep.txt", "new.md"]
    never_sent = {"scratch.tmp", "logs/events.log", "checkpoint-1/optimizer.bin"}
    assert never_sent.isdisjoint(hub_server.uploaded_paths)


def test_create_commit_operations_and_pull_request(hub_server):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    repo_id = f"{TEST_USER}/operations"
    with hub_online():
        api = _api()
        api.create_repo(repo_id)
        api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(f"dir/{i}.txt", f"{i}".encode()) for i in range(3)]
            + [CommitOperationAdd("top.txt", b"top")],
            commit_message="many files",
        )
        api.create_commit(
            repo_id,
            operations=[CommitOperationDelete("dir/"), CommitOperationDelete("top.txt")],
            commit_message="delete",
        )
        assert api.list_repo_files(repo_id) == [".gitattributes"]
        pr = api.create_commit(
            repo_id, operations=[CommitOperationAdd("pr.txt", b"pr")], commit_message="pr", create_pr=True
        )
        assert pr.pr_revision == "refs/pr/1"
        assert "pr.txt" in api.list_repo_files(repo_id, revision="refs/pr/1")
    assert hub_server.files(repo_id) == [".gitattributes"]


def test_dataset_repo_roundtrip(hub_server, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id = f"{TEST_USER}/tiny-dataset"
    rows = b'{"caption": "a cat"}\n{"caption": "a dog"}\n'
    with hub_online():
        api = _api()
        api.create_repo(repo_id, repo_type="dataset", private=True)
        api.upload_file(path_or_fileobj=rows, path_in_repo="data/train.jsonl", repo_id=repo_id, repo_type="dataset")
        assert api.dataset_info(repo_id).private is True
        assert api.list_repo_files(repo_id, repo_type="dataset") == [".gitattributes", "data/train.jsonl"]
        path = hf_hub_download(repo_id, "data/train.jsonl", repo_type="dataset", token=TEST_TOKEN, cache_dir=tmp_path)
        assert Path(path).read_bytes() == rows
        snap = Path(snapshot_download(repo_id, repo_type="dataset", token=TEST_TOKEN, cache_dir=tmp_path / "s"))
        assert (snap / "data" / "train.jsonl").read_bytes() == rows
    assert hub_server.repo_private(repo_id, repo_type="dataset")
    assert hub_server.files(repo_id, repo_type="dataset") == [".gitattributes", "data/train.jsonl"]
    assert not hub_server.repo_exists(repo_id)  # not a model repo


def test_errors_map_to_client_exceptions(tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = f"{TEST_USER}/errors"
    with hub_online():
        api = _api()
        api.create_repo(repo_id)
        kwargs = {"token": TEST_TOKEN, "cache_dir": tmp_path}
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(f"{TEST_USER}/does-not-exist", "x.txt", **kwargs)
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", **kwargs)
        with pytest.raises(RemoteEntryNotFoundError):
            hf_hub_download(repo_id, "missing.txt", **kwargs)
        with pytest.raises(RepositoryNotFoundError):
            api.repo_info(f"{TEST_USER}/does-not-exist")
        assert not api.repo_exists(f"{TEST_USER}/does-not-exist")


def test_offline_outside_hub_online(tmp_path):
    import diffusers.loaders.lora_base as lora_base
    import diffusers.utils.hub_utils as diffusers_hub_utils
    import huggingface_hub.constants as constants
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert constants.HF_HUB_OFFLINE and lora_base.HF_HUB_OFFLINE and diffusers_hub_utils.HF_HUB_OFFLINE
    with hub_online():
        assert not constants.is_offline_mode() and not lora_base.HF_HUB_OFFLINE
        assert os.environ["HF_HUB_OFFLINE"] == "0"
        _api().create_repo(f"{TEST_USER}/offline", exist_ok=True)
    assert constants.is_offline_mode() and lora_base.HF_HUB_OFFLINE and diffusers_hub_utils.HF_HUB_OFFLINE
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(f"{TEST_USER}/offline", ".gitattributes", cache_dir=tmp_path)


def test_diffusers_unet_and_lora_roundtrip(hub_server, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=8,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
    )
    unet.save_pretrained(tmp_path / "unet")
    lora = {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(2, 8),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 2),
    }
    (tmp_path / "lora").mkdir()
    save_file(lora, str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))

    with hub_online():
        api = _api()
        api.create_repo(f"{TEST_USER}/tiny-unet")
        api.upload_folder(repo_id=f"{TEST_USER}/tiny-unet", folder_path=tmp_path / "unet")
        api.create_repo(f"{TEST_USER}/tiny-lora")
        api.upload_folder(repo_id=f"{TEST_USER}/tiny-lora", folder_path=tmp_path / "lora")

        loaded = UNet2DConditionModel.from_pretrained(f"{TEST_USER}/tiny-unet", cache_dir=tmp_path / "cache")
        # LoRA weight-name discovery (model_info siblings) + download, as used by pipe.load_lora_weights(repo_id)
        state_dict, _ = StableDiffusionPipeline.lora_state_dict(f"{TEST_USER}/tiny-lora", cache_dir=tmp_path / "c2")

    assert hub_server.files(f"{TEST_USER}/tiny-unet") == [
        ".gitattributes", "config.json", "diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    expected, got = unet.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert state_dict.keys() == lora.keys()
    assert all(torch.equal(state_dict[k], lora[k]) for k in lora)

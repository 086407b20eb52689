"""Fake-Hub round trips (protocol-level: our code + huggingface_hub's HTTP flow, not Hub semantics)."""

from __future__ import annotations

import socket

import pytest
import torch
from fake_hub import NonLoopbackConnectionError


def test_dataset_push_to_hub_and_load_dataset_round_trip(fake_hub):
    import datasets

    ds = datasets.Dataset.from_dict({"caption": ["a red circle", "a blue square", "a green triangle"],
                                     "sample_idx": [0, 1, 2]})
    ds.push_to_hub("tester/curated", private=True)
    files = fake_hub.list_repo_files("tester/curated", repo_type="dataset")
    assert any(f.endswith(".parquet") for f in files) and "README.md" in files
    loaded = datasets.load_dataset("tester/curated", split="train")
    assert loaded["caption"] == ds["caption"] and loaded["sample_idx"] == [0, 1, 2]
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in fake_hub.requests)  # parquet went via LFS


def test_clip_push_to_hub_and_from_pretrained_round_trip(fake_hub):
    from transformers import CLIPModel

    from hf_mmsel.models import build_dual_encoder

    bundle = build_dual_encoder(captions=["a red circle", "a blue square"], seed=1)
    bundle.model.push_to_hub("tester/tiny-clip")
    bundle.tokenizer.push_to_hub("tester/tiny-clip")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(fake_hub.list_repo_files("tester/tiny-clip"))
    loaded = CLIPModel.from_pretrained("tester/tiny-clip")
    for (name, a), (_, b) in zip(bundle.model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("tester/tiny-clip")
    assert tok("a red circle").input_ids == bundle.tokenizer("a red circle").input_ids


def test_hf_api_errors_and_whoami(fake_hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    api = HfApi()
    assert api.whoami()["name"] == fake_hub.user
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("tester/missing")
    api.create_repo("tester/exists")
    api.create_repo("tester/exists", exist_ok=True)
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="dir/a.txt", repo_id="tester/exists",
                    commit_message="add a")
    assert fake_hub.read_file("tester/exists", "dir/a.txt") == b"hello"
    assert fake_hub.commit_titles("tester/exists")[-1] == "add a"
    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download("tester/exists", "dir/missing.txt")


def test_guard_refuses_non_loopback_addresses(fake_hub):
    with pytest.raises(NonLoopbackConnectionError):
        socket.getaddrinfo("huggingface.co", 443)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NonLoopbackConnectionError):
            sock.connect(("10.0.0.1", 443))
    finally:
        sock.close()


def test_offline_again_without_fixture():
    import datasets.config
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import get_token

    assert hub_constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert get_token() is None
    assert hub_constants.ENDPOINT.startswith("http://127.0.0.1:")


def test_render_cards_and_errors():
    from huggingface_hub import DatasetCard, ModelCard

    from hf_mmsel.hub import list_card_templates, render_card

    assert set(list_card_templates()) >= {"contrastive_model_card", "mola_adapter_card", "curated_dataset_card"}
    card = render_card("contrastive_model_card", card_data={"datasets": "easy-vqa", "tags": ["dissect"]},
                       model_id="tester/clip", method="dissect", noise_rate=0.3,
                       results=[{"setting": "dissect", "i2t_r1": 12.345, "rsum": 301.5}])
    assert isinstance(card, ModelCard)
    assert card.data.library_name == "hf_mmsel" and card.data.tags == ["hf_mmsel", "dissect"]
    assert "| dissect | 12.35 | 301.50 |" in card.content and "30.0 %" in card.content
    reparsed = ModelCard(card.content)  # the YAML front matter survives a parse
    assert reparsed.data.datasets == ["easy-vqa"]
    mola = render_card("mola_adapter_card", adapter_id="tester/mola", base_model="tiny", tasks=["colour", "shape"],
                       results={"colour": 0.9, "shape": 0.5})
    assert "import hf_mmsel" in mola.content and "PeftModel.from_pretrained" in mola.content
    assert "| 1 | shape |" in mola.content and "| shape | 0.5000 |" in mola.content
    data = render_card("curated_dataset_card", card_data={"source_datasets": "easy-vqa"}, dataset_id="tester/cur",
                       source_dataset="easy-vqa", method="gsc", num_source=200, num_kept=150,
                       estimated_noise_rate=0.25, histogram_image="score_hist.png")
    assert isinstance(data, DatasetCard) and "curated" in data.data.tags
    assert "150 kept of 200 (75.0 %)" in data.content and "![clean-score histogram](score_hist.png)" in data.content
    with pytest.raises(ValueError, match="available"):
        render_card("no_such_card")
    with pytest.raises(ValueError, match="modle_id"):
        render_card("contrastive_model_card", modle_id="typo", method="x")
    with pytest.raises(ValueError, match=r"needs \['model_id'\]"):
        render_card("contrastive_model_card", method="x")
    with pytest.raises(ValueError, match="source_dataset"):
        render_card("curated_dataset_card", dataset_id="d", method="gsc")


def test_push_folder_to_hub_needs_a_token(tmp_path):
    from hf_mmsel.hub import push_folder_to_hub

    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(RuntimeError, match="no Hugging Face token"):
        push_folder_to_hub(tmp_path, "tester/x")
    with pytest.raises(ValueError, match="repo_type"):
        push_folder_to_hub(tmp_path, "tester/x", repo_type="bucket", token="t")
    with pytest.raises(FileNotFoundError):
        push_folder_to_hub(tmp_path / "missing", "tester/x", token="t")


def test_push_folder_with_card(fake_hub, tmp_path):
    from huggingface_hub import ModelCard

    from hf_mmsel.hub import push_folder_to_hub, render_card

    render_card("mola_adapter_card", adapter_id="tester/ad", base_model="tiny").save(tmp_path / "README.md")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    info = push_folder_to_hub(tmp_path, "tester/ad", commit_message="push adapter")
    assert len(info.oid) == 40
    assert fake_hub.list_repo_files("tester/ad") == [".gitattributes", "README.md", "adapter_model.safetensors"]
    assert ModelCard.load("tester/ad").data.library_name == "hf_mmsel"
    assert fake_hub.commit_titles("tester/ad")[-1] == "push adapter"

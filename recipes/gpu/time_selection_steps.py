"""GPU timing: what one DISSect step costs against full training, and what cheaper fresh scoring saves (issue 9).

    python recipes/gpu/time_selection_steps.py --output_dir /tmp/time_steps            # 1 GPU, ViT-B/32 size
    python recipes/gpu/time_selection_steps.py --device cpu --tiny --output_dir /tmp/t  # CPU smoke (seconds)

A ViT-B/32-sized ``CLIPModel`` from ``CLIPConfig`` (vision 768 hidden, 12 layers, 12 heads, patch 32, 224 px;
text 512 hidden, 8 heads, 12 layers), random init, AdamW, symmetric InfoNCE, synthetic data; on cuda every
forward runs under ``torch.autocast(bfloat16)`` (the trainer's ``score_dtype="auto"``). A synthetic loader makes
uint8 images on the host, copies them to the device and normalises them, so loading fewer images is visible.
Modes (B candidates per step, k = B/2 kept):

* ``full``: load B, train on B.
* ``fresh``: load B, no-grad scoring forward on B (positive-pair cosines), keep the top k, train on k (DISSect).
* ``fresh_patch_drop``: ``fresh`` with ``score_patch_drop`` (FLIP-style, 0.5) in the scoring forward only.
* ``fresh_image_size``: ``fresh`` with ``score_image_size`` (default 160; ``interpolate_pos_encoding``).
* ``stale``: load B, train on k chosen from stored scores (``selection_score_source="last_visit"``).
* ``in_sampler``: ``stale`` with ``selection_in_sampler``: the loader produces only the k kept images.

Reported per mode: median step ms (loader + scoring + train step, synchronised), candidate samples/s (B per
step: the pool throughput) and, for the cheap modes, the Spearman rank agreement of their scores with exact
ones on one batch (random init: only a sanity value). A table is printed and ``timings.json`` written to
``--output_dir``. Not run by the CPU test suite (``--tiny`` is the CPU smoke mode).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from hf_mmsel.selection.cheap_scoring import patch_drop, resize_for_scoring, spearman

MODES = ("full", "fresh", "fresh_patch_drop", "fresh_image_size", "stale", "in_sampler")


def build_model(tiny: bool) -> tuple[CLIPModel, int, int]:
    """``(model, image_size, text_length)``: ViT-B/32-sized CLIP, or a tiny one for the CPU smoke run."""
    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      patch_size=8, image_size=32)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    vocab_size=1000, max_position_embeddings=16, bos_token_id=0, pad_token_id=1, eos_token_id=999)
        config, length = CLIPConfig(vision_config=vision, text_config=text, projection_dim=16), 16
    else:
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      patch_size=32, image_size=224)
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                    vocab_size=49408, max_position_embeddings=77)
        config, length = CLIPConfig(vision_config=vision, text_config=text, projection_dim=512), 77
    return CLIPModel(config), config.vision_config.image_size, length


class SyntheticLoader:
    """Random uint8 images + token ids made on the host, copied to the device and normalised (a stand-in for
    decoding + transfer; its cost grows with the number of images produced)."""

    def __init__(self, image_size: int, length: int, vocab: int, device: torch.device, seed: int = 0):
        self.image_size, self.length, self.vocab, self.device = image_size, length, vocab, device
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor([0.481, 0.458, 0.408], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.269, 0.261, 0.276], device=device).view(1, 3, 1, 1)

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        images = torch.randint(0, 256, (n, 3, self.image_size, self.image_size), dtype=torch.uint8,
                               generator=self.generator)
        ids = torch.randint(1, self.vocab - 1, (n, self.length), generator=self.generator)
        ids[:, -1] = self.vocab - 1  # eos = the last id (the text tower pools there)
        pin = self.device.type == "cuda"
        images = (images.pin_memory() if pin else images).to(self.device, non_blocking=True)
        pixels = (images.float() / 255.0 - self.mean) / self.std
        return {"pixel_values": pixels, "input_ids": ids.to(self.device),
                "attention_mask": torch.ones_like(ids, device=self.device)}


def subset(batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in batch.items()}


def embed(model: CLIPModel, batch, **image_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    image = model.get_image_features(pixel_values=batch["pixel_values"], **image_kwargs)
    text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def positive_cosines(model, batch, *, drop: float = 0.0, size: int | None = None, native: int = 224,
                     seed: int = 0) -> torch.Tensor:
    """No-grad scoring forward: ``cos(v_i, u_i)`` of every candidate (cheap with ``drop`` / ``size``)."""
    kwargs = {}
    if size is not None and size != native:
        batch = {**batch, "pixel_values": resize_for_scoring(batch["pixel_values"], size)}
        kwargs["interpolate_pos_encoding"] = True
    ctx = patch_drop(model, drop, torch.Generator().manual_seed(seed)) if drop > 0 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        image, text = embed(model, batch, **kwargs)
    return (image * text).sum(-1)


def train_step(model, optimizer, batch, autocast) -> float:
    with autocast():
        image, text = embed(model, batch)
        logits = model.logit_scale.exp().clamp(max=100.0) * image @ text.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_mode(mode, model, optimizer, loader, args, native, autocast) -> dict:
    B, k = args.batch_size, args.batch_size // 2
    device = torch.device(args.device)
    stored = torch.rand(B, device=device)  # stand-in for last-visit scores (stale / in-sampler read them)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast():  # selection (loader, scoring) under autocast; the train step opens its own
            if mode == "in_sampler":
                keep = torch.topk(stored, k).indices  # the sampler selects first, the loader makes k images
                batch = loader.batch(k)
            else:
                batch = loader.batch(B)
                if mode == "full":
                    keep = None
                elif mode == "stale":
                    keep = torch.topk(stored, k).indices
                else:
                    cos = positive_cosines(
                        model, batch, drop=args.patch_drop if mode == "fresh_patch_drop" else 0.0,
                        size=args.score_image_size if mode == "fresh_image_size" else None, native=native,
                        seed=step)
                    keep = torch.topk(cos, k).indices
                if keep is not None:
                    batch = subset(batch, keep)
        train_step(model, optimizer, batch, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {"mode": mode, "median_step_ms": 1000.0 * median, "samples_per_s": B / median,
              "trained_per_step": B if mode == "full" else k, "steps": len(times)}
    if mode in ("fresh_patch_drop", "fresh_image_size"):
        batch = loader.batch(B)
        with autocast():
            exact = positive_cosines(model, batch, native=native)
            cheap = positive_cosines(model, batch, drop=args.patch_drop if mode == "fresh_patch_drop" else 0.0,
                                     size=args.score_image_size if mode == "fresh_image_size" else None,
                                     native=native)
        result["score_spearman"] = spearman(cheap, exact)
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="time_selection_steps")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny CLIP, B=16, few steps (CPU smoke mode)")
    parser.add_argument("--batch_size", type=int, default=None, help="candidates B per step (256; tiny 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (20; tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (5; tiny 1)")
    parser.add_argument("--patch_drop", type=float, default=0.5)
    parser.add_argument("--score_image_size", type=int, default=None, help="fresh_image_size (160; tiny 16)")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (16 if args.tiny else 256)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.score_image_size = args.score_image_size or (16 if args.tiny else 160)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --tiny for the smoke run")
    torch.manual_seed(0)
    model, native, length = build_model(args.tiny)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = SyntheticLoader(native, length, model.config.text_config.vocab_size, device)

    def autocast():
        return (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    results = [run_mode(mode, model, optimizer, loader, args, native, autocast)
               for mode in args.modes.split(",") if mode]
    full = next((r for r in results if r["mode"] == "full"), None)
    for r in results:
        r["speedup_vs_full"] = full["median_step_ms"] / r["median_step_ms"] if full else None
    header = f"{'mode':<18}{'step ms':>10}{'samples/s':>12}{'trained':>9}{'vs full':>9}{'spearman':>10}"
    print(f"device={device} tiny={args.tiny} B={args.batch_size} k={args.batch_size // 2} steps={args.steps}")
    print(header)
    for r in results:
        rho = r.get("score_spearman")
        print(f"{r['mode']:<18}{r['median_step_ms']:>10.1f}{r['samples_per_s']:>12.1f}{r['trained_per_step']:>9d}"
              f"{(r['speedup_vs_full'] or float('nan')):>8.2f}x{'' if rho is None else f'{rho:.3f}':>10}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "tiny": args.tiny, "batch_size": args.batch_size, "k": args.batch_size // 2,
            "steps": args.steps, "warmup": args.warmup, "patch_drop": args.patch_drop,
            "score_image_size": args.score_image_size, "dtype": "bfloat16" if device.type == "cuda" else "float32"}
    (out / "timings.json").write_text(json.dumps({"settings": meta, "results": results}, indent=2))
    print(f"wrote {out / 'timings.json'}")
    return results


if __name__ == "__main__":
    main()

"""The DeepTransformers (deep_transformer, swdt, dot) where the other members go: greedy generation with the growing
cache equals the full forward, and `atlas-train` (train + export), `atlas-eval` and `atlas-generate` run end to end.
(The model-level checks every member gets, training, packed documents, decoding, segments, FLOPs, run over MIXERS in
test_model_family.py; tensor, data and context parallelism in test_dual_parallel.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from atlas_train.eval import cli
from atlas_train.eval import generate as generate_cli
from atlas_train.eval.generate import generate
from atlas_train.model import build_model
from atlas_train.model.config import DUAL_MIXERS, ModelConfig
from eval_helpers import train_tokenizer, write_export
from repo_paths import REPO


def tiny_model(mixer: str):
    cfg = ModelConfig(mixer=mixer, vocab_size=64, d_model=16, n_layers=2, n_heads=2, mlp_hidden=32, max_seq_len=64,
                      chunk_size=4, window=None if mixer == "deep_transformer" else 3, memory_expansion=2,
                      gate_rank=4, n_persistent=5)
    torch.manual_seed(0)
    return build_model(cfg).double().eval()


def full_forward_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("mixer", DUAL_MIXERS)
def test_greedy_generate_equals_the_full_forward(mixer):
    """One prompt pass then T=1 steps on the growing state; the prompt in segments off the chunk grid; and
    cuda_graph=True, which cannot keep a growing cache in static buffers, decodes by plain steps."""
    model = tiny_model(mixer)
    prompt = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    want = full_forward_greedy(model, prompt, 8)
    assert torch.equal(generate(model, prompt, 8), want)
    assert torch.equal(generate(model, prompt, 8, prefill_chunk=3), want)
    assert torch.equal(generate(model, prompt, 8, cuda_graph=True), want)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).cache
        grown = model(prompt[:, :1], cache=cache, use_cache=True).cache
    assert grown["layers.0.mixer.mem.keys"].shape[2] == cache["layers.0.mixer.mem.keys"].shape[2] + 1


def test_training_configs_set_the_spec_defaults():
    """§8's table: the loss and window of each member, 64 persistent pairs, the scale at sqrt(dh)."""
    for mixer, loss, window in (("deep_transformer", "dot", 1), ("swdt", "dot", 64), ("dot", "l2", 64)):
        model = build_model(ModelConfig(mixer=mixer, vocab_size=64, d_model=32, n_heads=2, n_layers=1))
        mixer_module = model.layers[0].mixer
        assert mixer_module.scan_options["loss"] == loss and mixer_module.gates.window == window
        assert mixer_module.memory.K0.shape == (2, 64, 16) and mixer_module.gates.alpha is None
        torch.testing.assert_close(torch.nn.functional.softplus(mixer_module.scale_raw), torch.full((2,), 4.0))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("dual_export")
    return write_export(root / "export", train_tokenizer(root), mixer="swdt", window=3, n_persistent=4)


def test_eval_and_generate_cli_run_on_an_export(export, tmp_path, capsys):
    out_json = tmp_path / "mqar.json"
    assert cli.main(["--task", "mqar", "--checkpoint", str(export), "--out", str(out_json), "--pairs", "2",
                     "--seq-lens", "16", "--samples", "4", "--batch-size", "4", "--no-progress"]) == 0
    assert all(0 <= r["accuracy"] <= 1 for r in json.loads(out_json.read_text())["results"])
    capsys.readouterr()
    assert generate_cli.main(["--checkpoint", str(export), "--prompt", "In the beginning", "--max-new-tokens", "5",
                              "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("In the beginning")


def test_train_cli_trains_and_exports_a_member(tmp_path):
    """`atlas-train` trains a member and exports it, each in its own process as on the command line (in this process
    its process group, or DeepSpeed's record of it once torn down, would reach the tests that follow)."""
    from atlas_train.train.export import load_exported

    run = tmp_path / "run"
    overrides = ["model.mixer=deep_transformer", "model.vocab_size=48", "model.d_model=16", "model.n_layers=1",
                 "model.n_heads=2", "model.mlp_hidden=32", "model.max_seq_len=32", "model.chunk_size=8",
                 "model.memory_expansion=2", "model.n_persistent=4", f"train.out_dir={run}", "train.steps=2",
                 "train.seq_len=32", "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_every=0",
                 "train.save_every=2", "train.progress=false", "train.precision=fp32", "train.synthetic_data=true"]
    cli = [sys.executable, "-m", "atlas_train.train.cli"]
    subprocess.run([*cli, "--config", str(REPO / "configs/demo.yaml"), *overrides], check=True, cwd=tmp_path,
                   capture_output=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2] and "memory/eta" in rows[-1]
    subprocess.run([*cli, "export", "--checkpoint", str(run), "--out", str(tmp_path / "export")], check=True,
                   cwd=tmp_path, capture_output=True)
    model, run_cfg, _ = load_exported(tmp_path / "export")
    assert run_cfg.model.mixer == "deep_transformer" and run_cfg.model.inner_loss == "dot"
    assert generate(model, torch.tensor([1, 2, 3]), max_new_tokens=4).shape == (7,)

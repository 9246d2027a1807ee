"""The training speed settings: the fused loss equals the plain one, recompute modes resolve, the micro-batch probe.

liger-kernel's fused loss is a Triton kernel: it runs here on CPU tensors in the interpreter (tests/conftest.py).
"""

import pytest
import torch

from atlas_train.model import ModelConfig, build_model
from atlas_train.train.microbatch import ProbeError, candidates, engine_state_bytes, probe_micro_batch
from atlas_train.train.speed import blocks_of, compile_blocks, fused_linear_cross_entropy, resolve_recompute


def tiny(mixer: str, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(mixer=mixer, vocab_size=96, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64,
                                   chunk_size=8, memory_expansion=2, max_seq_len=64, update="chunk", **kw))


@pytest.mark.parametrize("mixer,compiled", [("transformer", True), ("atlas", False), ("titans", False)])
def test_compile_takes_attention_only_blocks(mixer, compiled):
    """`train.compile` compiles attention-only blocks whole and leaves blocks with a memory layer eager, norms and
    feed-forward included (why: train/speed.py)."""
    model = tiny(mixer)
    compile_blocks(model)
    for block in blocks_of(model):
        parts = [block, *block.modules()]
        assert any(m._compiled_call_impl is not None for m in parts) == compiled


@pytest.mark.parametrize("mixer", ["transformer", "atlas"])
def test_fused_cross_entropy_gives_the_plain_loss_and_gradients(mixer):
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100  # ignored labels count in neither
    results = []
    for fused in (False, True):
        model = tiny(mixer)
        if fused:
            model.fused_loss = fused_linear_cross_entropy()
        out = model(ids[:, :-1], labels=labels)
        assert (out.logits is None) == fused  # the fused path never builds the logits
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_loss_is_left_out_of_evaluation():
    """Evaluation and decoding want logits: the fused loss serves training steps only."""
    model = tiny("transformer")
    model.fused_loss = fused_linear_cross_entropy()
    model.eval()
    ids = torch.randint(0, 96, (1, 9))
    assert model(ids[:, :-1], labels=ids[:, 1:]).logits is not None


def test_recompute_auto_recomputes_memory_models_only():
    assert resolve_recompute("auto", tiny("transformer")) == "none"
    for mixer in ("atlas", "atlas_mag", "atlas_mal", "titans"):
        assert resolve_recompute("auto", tiny(mixer)) == "full"
    assert resolve_recompute("selective", tiny("transformer")) == "selective"


def test_micro_batch_candidates_divide_the_rows_per_rank():
    assert candidates(16) == [1, 2, 4, 8, 16]
    assert candidates(12) == [1, 2, 4]
    assert candidates(1) == [1]


def test_probe_keeps_the_largest_micro_batch_under_budget():
    gib = 2**30
    peaks = {1: 10 * gib, 2: 18 * gib, 4: 34 * gib, 8: 67 * gib}
    result = probe_micro_batch(lambda mb: peaks[mb], [1, 2, 4, 8], budget_bytes=72 * gib, engine_bytes=6 * gib)
    assert result.micro_batch_size == 4  # 67 + 6 > 72
    assert list(result.peak_gib) == [1, 2, 4, 8]


def test_probe_stops_at_out_of_memory():
    def run(mb):
        if mb >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return float(mb)

    ran = []
    result = probe_micro_batch(lambda mb: ran.append(mb) or run(mb), [1, 2, 4, 8], budget_bytes=1e12, engine_bytes=0)
    assert result.micro_batch_size == 2 and ran == [1, 2, 4]


def test_probe_refuses_when_nothing_fits():
    with pytest.raises(ProbeError, match="not even micro-batch 1"):
        probe_micro_batch(lambda mb: 100.0, [1, 2], budget_bytes=50.0, engine_bytes=0)


def test_engine_state_shrinks_with_zero_partitioning():
    n = 1_000_000
    assert engine_state_bytes(n, 0, 8) == 16 * n
    assert engine_state_bytes(n, 1, 8) == 12 * n / 8 + 4 * n
    assert engine_state_bytes(n, 2, 8) == 16 * n / 8


def train_tiny(out_dir, mixer: str, **train_kw) -> list[float]:
    """Three steps of a tiny model on synthetic batches in fp32 (the trainer's whole loop); the logged losses."""
    import json
    from dataclasses import dataclass, field

    from atlas_train.parallel import ParallelConfig
    from atlas_train.train.config import TrainConfig
    from atlas_train.train.trainer import train

    @dataclass
    class RunCfg:
        model: ModelConfig = field(default_factory=lambda: ModelConfig(
            mixer=mixer, vocab_size=96, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, chunk_size=8,
            memory_expansion=2, max_seq_len=32, update="chunk"))
        data: dict = field(default_factory=dict)
        parallel: ParallelConfig = field(default_factory=ParallelConfig)
        train: TrainConfig = field(default_factory=TrainConfig)

    tc = TrainConfig(out_dir=str(out_dir), steps=3, seq_len=16, micro_batch_size=2, warmup_steps=1, eval_every=0,
                     save_every=0, progress=False, precision="fp32", lr=1e-2, synthetic_data=True, **train_kw)
    assert train(RunCfg(train=tc)) == 0
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("mixer,recompute", [("transformer", "selective"), ("atlas", "full")])
def test_fast_training_path_gives_the_plain_losses(tmp_path, capsys, mixer, recompute):
    """A few training steps with every speed setting on (compiled blocks, recompute, the fused loss under Triton's
    interpreter) against the plain path: the same losses to float32 rounding."""
    plain = train_tiny(tmp_path / "plain", mixer, activation_checkpointing="none", compile=False,
                       fused_cross_entropy=False)
    fast = train_tiny(tmp_path / "fast", mixer, activation_checkpointing=recompute, compile=True,
                      fused_cross_entropy=True)
    assert f"activation checkpointing {recompute}, compile on, fused cross-entropy on" in capsys.readouterr().out
    assert len(plain) == 3
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-4, atol=1e-5)


def test_profiled_step_writes_its_trace_and_table_and_changes_nothing(tmp_path):
    """train.profile_step records that step alone: a trace and a table of the operators it ran (the optimizer's
    fused AdamW among them), and the run's losses are those of an unprofiled run."""
    plain = train_tiny(tmp_path / "plain", "transformer")
    profiled = train_tiny(tmp_path / "profiled", "transformer", profile_step=2)
    assert profiled == plain
    folder = tmp_path / "profiled" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["kernels.rank0.txt", "trace.rank0.json.gz"]
    table = (folder / "kernels.rank0.txt").read_text()
    assert table.startswith("step 2, sorted by self_cpu_time_total")
    assert "aten::_fused_adamw_" in table and "aten::mm" in table


def test_profile_step_outside_the_run_is_refused():
    from atlas_train.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"profile_step must be a step of the run \(1..3\), got 4"):
        TrainConfig(steps=3, profile_step=4).validate()


def test_compiled_attention_block_reads_the_rotary_angles_instead_of_computing_them():
    """The compiled block's kernels, forward and backward, evaluate no pow, sin or cos: training's rotary angles come
    from the RotaryTable, where Inductor had fused their computation into every element of q and k."""
    import re

    from torch._inductor.utils import run_and_get_code

    from atlas_train.model.block import Block

    cfg = ModelConfig(mixer="transformer", vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=64).resolved()
    block = Block(cfg)
    x = torch.randn(2, 64, 32, requires_grad=True)
    compiled = torch.compile(block)

    def step():
        compiled(x)[0].sum().backward()

    _, code = run_and_get_code(step)
    assert code and not re.findall(r"\b(?:pow|sin|cos)\(", "\n".join(code))

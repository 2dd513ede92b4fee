"""bf16 mixed precision on CPU (`TrainConfig.precision: bf16`, hiermem.stepper / hiermem.kernels).

Mixed precision is a numerics choice, not a fast path with the same results: these tests compare it
with float32 within bfloat16's tolerance, check each CPU-specific piece against an independent
computation, and check the fallback where the CPU has no native bfloat16 products. They force the
capability check (`cpu_bf16_native`) where needed, so they run on every CPU (emulated bf16 is only slow).
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import packed_batch, small_memory_model

from hiermem import stepper as stepper_module
from hiermem.config import MemoryConfig
from hiermem.kernels import attention, fused_linear_cross_entropy, gather_rows_low
from hiermem.memory_kinds import MEMORY_KINDS
from hiermem.model import HierMemLM
from hiermem.stepper import TrainStepper, resolve_precision



def _batch(seed: int = 0):
    return packed_batch(seed=seed)


def _model(kind: str) -> HierMemLM:
    return small_memory_model(kind)


def _grads(stepper: TrainStepper, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and every gradient training sees (anchor, generic block, active bank rows) for one batch."""
    tokens, segments, paths = batch
    use_generic = torch.tensor([False, True, False, False, False, False])
    active = stepper.bank_opt.gather(paths, use_generic=use_generic)
    stepper.model.zero_grad(set_to_none=True)
    loss = stepper.loss(tokens, segments, paths, use_generic, active)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in stepper.model.named_parameters() if p.grad is not None}
    grads.update({f"bank{level}": a.rows.grad.clone() for level, a in active.items()})
    return float(loss.detach()), grads


def test_fused_cross_entropy_with_bf16_products_equals_a_reference_on_rounded_products():
    """Bug caught: the padded rows (rows are padded to a multiple of 64 for oneDNN) counted in the loss
    or in a gradient, a chunk boundary dropping rows, the widening copy reading the wrong rows, the
    weight gradient missing a chunk. Reference: float64 cross-entropy of the bf16-rounded products."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(150, 8, generator=g, requires_grad=True)  # 3 chunks of 64 rows, the last one padded
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (150,), generator=g)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk=64, low=torch.bfloat16)
    (2.5 * loss).backward()
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    logits = torch.mm(h16, w16.t()).double().requires_grad_()  # what the kernel's product gives
    ref = F.cross_entropy(logits, targets, reduction="sum")
    (2.5 * ref).backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    want_h = logits.grad @ w16.double()
    want_w = logits.grad.t() @ h16.double()
    # the gradient products take bf16-rounded probabilities and round their output: bf16's tolerance
    torch.testing.assert_close(hidden.grad.double(), want_h, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad.double(), want_w, rtol=2e-2, atol=5e-2)
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_gathered_rows_in_bf16_sum_their_gradients_in_float32():
    """Bug caught: the touched blocks' gradients summed in bfloat16 (torch's own index_select backward
    on a bf16 copy rounds after every addition: 64 sequences sharing a block lose ~2 digits), rows
    gathered from the wrong positions, or a gradient in another dtype than the table's.
    Reference: the gather and the sum in float64."""
    g = torch.Generator().manual_seed(4)
    table = torch.randn(5, 7, generator=g, requires_grad=True)
    pos = torch.cat([torch.zeros(64, dtype=torch.long), torch.tensor([3, 1, 3])])  # 64 sequences on block 0
    rows = gather_rows_low(table, pos, torch.bfloat16)
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, table.detach().bfloat16()[pos])
    upstream = (1 + torch.rand(len(pos), 7, generator=g)).bfloat16()
    rows.backward(upstream)
    want = torch.zeros(5, 7, dtype=torch.float64).index_add_(0, pos, upstream.double())
    assert table.grad.dtype == torch.float32
    torch.testing.assert_close(table.grad.double(), want, rtol=1e-6, atol=1e-6)
    in_bf16 = torch.zeros(5, 7, dtype=torch.bfloat16).index_add_(0, pos, upstream)  # what the bug would give
    assert not torch.allclose(in_bf16.double(), want, rtol=1e-6, atol=1e-6)


def test_attention_runs_in_float32_under_cpu_autocast_only():
    """Bug caught: attention left in bfloat16 under CPU autocast (torch's CPU flash-attention
    backward in bf16 took 5x its float32 time, more than the whole bf16 gain), or upcast outside
    autocast (changing float32 and GPU results). Reference: torch's SDPA on the upcast inputs."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 7, 16, generator=g).bfloat16() for _ in range(3))
    mask = torch.rand(2, 1, 7, 7, generator=g) < 0.7
    mask |= torch.eye(7, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, attn_mask=mask)
        causal = attention(q, k, v, is_causal=True)
    assert got.dtype == torch.float32
    assert torch.equal(got, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask))
    assert torch.equal(causal, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True))
    plain = attention(q, k, v, attn_mask=mask)  # no autocast: exactly torch's call, in the inputs' dtype
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("kind", sorted(MEMORY_KINDS))
def test_bf16_step_matches_fp32_within_bf16_tolerance_for_every_memory_kind(kind, monkeypatch):
    """Bug caught: a gradient lost under autocast (e.g. fetched rows cast outside the graph: no bank
    gradient), the fused head taking another path than the plain bf16 one, bf16 silently not applied.
    Reference: the same model and batch in float32, and the plain (unfused) bf16 path."""
    monkeypatch.setattr(stepper_module, "cpu_bf16_native", lambda: True)
    batch = _batch()
    base = _model(kind)
    results = {}
    for name, precision, fast in (("fp32", "fp32", True), ("bf16", "bf16", True), ("bf16-plain", "bf16", False)):
        model = copy.deepcopy(base)
        model.fast = fast
        stepper = TrainStepper(model, lr=1e-3, bank_lr=1e-3, precision=precision)
        assert stepper.precision == precision
        results[name] = _grads(stepper, batch)
    (loss32, g32), (loss16, g16), (loss_plain, g_plain) = results["fp32"], results["bf16"], results["bf16-plain"]
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=1e-2)  # bf16 really ran, and is close
    assert loss_plain == pytest.approx(loss16, rel=1e-2)
    assert set(g16) == set(g32) == set(g_plain)
    assert any(name.startswith("bank") for name in g16)
    for name, want in g32.items():
        for got in (g16[name], g_plain[name]):
            assert got.dtype == torch.float32, name  # master weights and their gradients stay float32
            cosine = F.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0)
            assert float(cosine) > 0.99, (name, float(cosine))
            assert float(got.norm()) == pytest.approx(float(want.norm()), rel=5e-2), name


def test_bf16_without_native_products_falls_back_to_fp32_with_one_line(monkeypatch, caplog):
    """Bug caught: `precision: bf16` on a CPU without AMX / AVX512-BF16 running emulated bf16 (slower
    than float32) silently, or crashing. The fallback trains exactly as fp32 and says so once."""
    monkeypatch.setattr(stepper_module, "cpu_bf16_native", lambda: False)
    batch = _batch(seed=1)
    base = _model("ffn")
    with caplog.at_level("INFO", logger="hiermem.stepper"):
        fallback = TrainStepper(copy.deepcopy(base), lr=1e-3, precision="bf16")
    reference = TrainStepper(copy.deepcopy(base), lr=1e-3, precision="fp32")
    assert fallback.precision == "fp32" and not fallback.autocast
    assert sum("no native bfloat16" in r.getMessage() for r in caplog.records) == 1
    (loss_a, grads_a), (loss_b, grads_b) = _grads(fallback, batch), _grads(reference, batch)
    assert loss_a == loss_b and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_b)


def test_precision_resolution_and_config_errors(smoke_data_config):
    """Bug caught: a misspelt precision accepted, float32 asked for with a bfloat16 bank (a crash at
    the first product on a GPU), the default changing what CPU and GPU runs did before, or the new
    field changing every earlier run's id."""
    from hiermem.demo import DemoConfig
    from hiermem.train import TrainConfig
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", cuda) == "bf16"
    assert resolve_precision("auto", cpu, low_bank=True) == "bf16"
    assert resolve_precision("fp32", cuda) == "fp32" and resolve_precision("bf16", cuda) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp32", cuda, low_bank=True)
    with pytest.raises(ValueError, match="'precision'.*one of"):
        TrainConfig(data=smoke_data_config, precision="fp16")
    with pytest.raises(ValueError, match="'precision'.*bank_dtype"):
        TrainConfig(data=smoke_data_config, precision="fp32", optim=TrainConfig().optim.replace(bank_dtype="bfloat16"))
    with pytest.raises(ValueError, match="'precision'"):
        DemoConfig(scale="smoke", precision="half")
    assert "precision" not in TrainConfig(data=smoke_data_config).to_dict()  # run ids of earlier runs unchanged
    assert TrainConfig(data=smoke_data_config, precision="bf16").to_dict()["precision"] == "bf16"


def test_bf16_training_run_records_its_precision_and_resumes_exactly(smoke_data_config, pretrained_anchor,
                                                                      tmp_path, monkeypatch):
    """Bug caught: a bf16 run whose provenance does not say it trained in bf16 (or says so after a
    fallback to fp32), or whose resume is not exact (bf16 state not restored the same way)."""
    from hiermem.checkpoint import load_model
    from hiermem.rundir import RunDir
    from hiermem.train import TrainConfig, train
    monkeypatch.setattr(stepper_module, "cpu_bf16_native", lambda: True)
    cfg = TrainConfig(stage="memory-frozen", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                      memory=MemoryConfig(type="ffn", multipliers=(4, 4)), tokens=7 * 4 * 128, batch_size=4,
                      checkpoint_every=3, log_every=2, precision="bf16")
    full = train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_after_steps=4)
    train(cfg, tmp_path / "resumed", progress=False)
    assert json.loads((full / "provenance.json").read_text())["precision"] == "bf16"
    a, b = load_model(RunDir(full).final), load_model(RunDir(tmp_path / "resumed").final)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    monkeypatch.setattr(stepper_module, "cpu_bf16_native", lambda: False)
    fallback = train(cfg, tmp_path / "fallback", progress=False)
    assert json.loads((fallback / "provenance.json").read_text())["precision"] == "fp32"


def test_demo_precision_reaches_every_run(tmp_path, monkeypatch):
    """Bug caught: `hiermem demo --precision bf16` (or `precision:` in a recipe) not reaching the
    runs' TrainConfigs, so the main job trains in float32 while saying bf16."""
    from hiermem import demo as demo_module
    from hiermem.cli import build_parser
    seen = {}
    monkeypatch.setattr(demo_module, "run_demo", lambda cfg, *args, **kwargs: seen.setdefault("cfg", cfg))
    args = build_parser("demo").parse_args(["demo", "--scale", "smoke", "--precision", "bf16", "--quiet"])
    args.func(args)
    runs = demo_module.demo_runs(seen["cfg"], tmp_path, vocab_size=512)
    assert set(runs) == set(demo_module.RUNS) and all(r.precision == "bf16" for r in runs.values())
    path = tmp_path / "recipe.yaml"
    path.write_text("scale: smoke\nprecision: bf16\n")
    assert all(r.precision == "bf16" for r in demo_module.demo_runs(demo_module.DemoConfig.load(path), tmp_path, 512).values())
    assert all(r.precision == "auto" for r in demo_module.demo_runs(demo_module.SCALES["smoke"], tmp_path, 512).values())

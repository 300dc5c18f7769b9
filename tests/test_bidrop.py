"""BiDrop end to end on one process: a tiny BERT trained with BiDrop equals the oracle replay of
the same passes, vanilla is reproduced bit for bit, the hooks, seeds and the skip path behave."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.bidrop import SkipLimitError, derive_seed
from tests.models import random_batch, split_chunks, tiny_bert
from tests.oracle import assert_mask_matches
from tests.reference import Reference, lockstep, record_reads
from tests.replay import replay_step

# Attention key biases have analytically zero gradients (float noise that Adam amplifies).
NOISE_ONLY = "attention.self.key.bias"
# Lockstep weights against the reference (relative to each element's travel, tests/reference.py): fp32
# rounding; AdamW divides by sqrt(v) + eps, which amplifies it on tiny gradients (embedding rows): measured
# <= 3.1e-5 over 5 steps. A lost, doubled or mis-masked update reads ~1.
WEIGHT_BOUND = {"sgd": 1e-5, "adamw": 1e-4}


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def assert_params_close(model_a, model_b, rtol=1e-5, atol=1e-7):
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        if NOISE_ONLY in name:
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("k, chunks", [(2, 1), (3, 2)])
def test_every_step_follows_an_independent_reference(optimizer_kind, k, chunks):
    """5 steps in lockstep with a reference replica (tests/reference.py) that computes its own passes
    and feeds the float64 oracle's update to its own optimizer: at every step Bi-Drop's reads equal the
    reference's passes, its mask the oracle's and its weights the reference's (SGD: the masked elements
    unchanged, bit for bit)."""
    config = BiDropConfig(k=k, p=0.3, seed=23)
    model = tiny_bert()
    reference = Reference(tiny_bert(), lambda params: make_optimizer(optimizer_kind, params), config)
    bidrop = BiDrop(model, make_optimizer(optimizer_kind, model.parameters()), config)

    def eligible_weights() -> torch.Tensor:
        return torch.cat([q.detach().reshape(-1) for n, q in model.named_parameters() if config.is_eligible(n)])

    for step in range(5):
        batch = split_chunks(random_batch(step), chunks)
        before = eligible_weights()
        with record_reads(bidrop) as reads:
            result = bidrop.step(batch)
        row = lockstep(reference, bidrop, reads, batch)
        assert not result.skipped and len(reads) == k
        assert row["read_err"] <= 1e-6 and row["mask_hard_differs"] == 0, (step, row)
        assert row["weight_err"] <= WEIGHT_BOUND[optimizer_kind], (step, row)
        assert result.kept_fraction == pytest.approx(row["kept"] / row["N"], abs=2e-4)
        if optimizer_kind == "sgd":
            masked = ~row["mask"]
            assert masked.sum() > 0.6 * masked.numel()
            assert torch.equal(before[masked], eligible_weights()[masked])


@pytest.mark.parametrize("score", ["product", "perturbation", "scaling"])
@pytest.mark.parametrize("rescale", [False, True])
def test_hooks_write_the_oracle_mask_and_update(score, rescale):
    """The lower-level hooks: after apply_mask() the grads hold the oracle's masked mean."""
    config = BiDropConfig(k=2, p=0.25, score=score, rescale=rescale)
    model = tiny_bert(seed=1)
    oracle_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bidrop = BiDrop(model, optimizer, config)
    batch = random_batch(5)
    torch.manual_seed(7)
    bidrop.begin_step()
    for _ in range(config.k):
        model(**batch).loss.backward()
        bidrop.fold_pass()
    result = bidrop.apply_mask()
    grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    optimizer.step()
    torch.manual_seed(7)
    oracle = replay_step(oracle_model, torch.optim.SGD(oracle_model.parameters(), lr=0.1), [batch], k=config.k,
                         p=config.p, score=score, rescale=rescale, include=config.include)
    flat = torch.cat([grads[n].reshape(-1) for n, _ in model.named_parameters() if config.is_eligible(n)])
    assert_mask_matches(flat != 0, oracle, ignore=oracle.mean == 0)  # a zero mean reads as masked
    torch.testing.assert_close(flat.double(), oracle.update, rtol=1e-5, atol=1e-9)
    assert result.kept_fraction == pytest.approx(oracle.mask.float().mean().item(), abs=1e-3)
    assert result.threshold == pytest.approx(oracle.tau, rel=1e-5)
    assert_params_close(model, oracle_model)


@pytest.mark.parametrize("config", [BiDropConfig(k=1, p=0.3), BiDropConfig(k=1, p=1.0), BiDropConfig(k=1, p=0.3, rescale=True)])
@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
def test_k1_is_vanilla_bit_for_bit(config, optimizer_kind):
    model = tiny_bert(seed=2)
    vanilla = copy.deepcopy(model)
    bidrop = BiDrop(model, make_optimizer(optimizer_kind, model.parameters()), config)
    vanilla_opt = make_optimizer(optimizer_kind, vanilla.parameters())
    for step in range(3):
        batch = random_batch(step)
        torch.manual_seed(step)
        result = bidrop.step(batch)
        torch.manual_seed(step)
        vanilla(**batch).loss.backward()
        vanilla_opt.step()
        vanilla_opt.zero_grad()
        assert result.kept_fraction == 1.0
    for a, b in zip(model.parameters(), vanilla.parameters()):
        assert torch.equal(a, b)


def test_p1_updates_with_the_mean_of_the_passes():
    config = BiDropConfig(k=3, p=1.0)
    model = tiny_bert(seed=3)
    oracle_model = copy.deepcopy(model)
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.5), config)
    batch = random_batch(1)
    torch.manual_seed(11)
    assert bidrop.step(batch).kept_fraction == 1.0
    torch.manual_seed(11)
    oracle = replay_step(oracle_model, torch.optim.SGD(oracle_model.parameters(), lr=0.5), [batch], k=3, p=1.0,
                         include=config.include)
    assert bool(oracle.mask.all())
    assert_params_close(model, oracle_model, rtol=1e-6, atol=1e-8)


def test_seeded_passes_reproduce_and_leave_the_global_rng_alone():
    config = BiDropConfig(k=2, p=0.3, seed=1234)
    runs = []
    for _ in range(2):
        model = tiny_bert(seed=4)
        bidrop = BiDrop(model, torch.optim.AdamW(model.parameters(), lr=1e-2), config)
        torch.manual_seed(0)
        state = torch.get_rng_state()
        for step in range(2):
            bidrop.step(random_batch(step))
        assert torch.equal(torch.get_rng_state(), state), "a seeded step drew from the global RNG"
        runs.append(model)
    for a, b in zip(*(m.parameters() for m in runs)):
        assert torch.equal(a, b)
    # And pass j of step t is dropout seeded by (seed, t, j, rank): replay it by hand.
    model = tiny_bert(seed=4)
    replayed = copy.deepcopy(model)
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.5), config)
    bidrop.step(random_batch(0))
    replay_step(replayed, torch.optim.SGD(replayed.parameters(), lr=0.5), [random_batch(0)], k=2, p=0.3,
                include=config.include, before_pass=lambda j: torch.manual_seed(derive_seed(1234, 0, j, 0)))
    assert_params_close(model, replayed)


def test_unseeded_passes_use_the_global_rng_in_pass_order():
    """Different global seeds give different dropout, hence different updates."""
    results = []
    for seed in (0, 1):
        model = tiny_bert(seed=5)
        bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.5), BiDropConfig(k=2, p=0.3))
        torch.manual_seed(seed)
        bidrop.step(random_batch(0))
        results.append(torch.cat([q.detach().reshape(-1) for q in model.parameters()]))
    assert not torch.equal(*results)


def test_non_finite_pass_skips_the_step_and_leaves_parameters_and_state_alone():
    model = tiny_bert(seed=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bidrop = BiDrop(model, optimizer, BiDropConfig(k=2, p=0.3))
    bidrop.step(random_batch(0))
    params = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    calls = {"n": 0}

    def poisoned_loss(module, batch):
        calls["n"] += 1
        loss = module(**batch).loss
        return loss * float("nan") if calls["n"] == 2 else loss  # pass 2 only

    result = bidrop.step(random_batch(1), loss_fn=poisoned_loss)
    assert result.skipped and bidrop.skipped_steps == 1 and result.kept_fraction == 0.0
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]), name
    assert repr(optimizer.state_dict()) == repr(opt_state)
    assert not bidrop.step(random_batch(2)).skipped  # and training goes on


@pytest.mark.parametrize("target", ["eligible", "other"])
def test_inf_gradient_anywhere_skips(target):
    model = tiny_bert(seed=7)
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2, p=0.3))
    name = "bert.encoder.layer.0.output.dense.weight" if target == "eligible" else "classifier.weight"
    param = dict(model.named_parameters())[name]
    before = [q.detach().clone() for q in model.parameters()]
    bidrop.begin_step()
    for j in range(2):
        model(**random_batch(0)).loss.backward()
        if j == 0:
            param.grad.view(-1)[0] = float("inf")
        bidrop.fold_pass()
    assert bidrop.apply_mask().skipped
    assert all(q.grad is None for q in model.parameters())
    bidrop.backend.optimizer_step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hook_misuse_is_reported():
    model = tiny_bert()
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2))
    with pytest.raises(RuntimeError, match="begin_step"):
        bidrop.fold_pass()
    bidrop.begin_step()
    model(**random_batch(0)).loss.backward()
    bidrop.fold_pass()
    with pytest.raises(RuntimeError, match="config.k = 2"):
        bidrop.apply_mask()


def test_patterns_selecting_nothing_are_an_error():
    model = tiny_bert()
    with pytest.raises(ValueError, match="select no trainable parameter"):
        BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(include=("no_such_layer",)))


def test_state_dict_round_trip():
    model = tiny_bert()
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2, seed=3))
    bidrop.step(random_batch(0))
    other = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2, seed=3))
    other.load_state_dict(bidrop.state_dict())
    assert other.step_index == 1 and math.isfinite(other.step(random_batch(1)).loss)


def test_a_model_without_dropout_is_refused_unless_allowed(caplog):
    model = tiny_bert(dropout=0.0)
    with pytest.raises(ValueError, match="no dropout module with p > 0.*allow_no_dropout=True"):
        BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2))
    with caplog.at_level("WARNING"):
        BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2, allow_no_dropout=True))
    assert "running anyway" in caplog.text
    BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=1))  # one pass: no need


def test_too_many_skips_in_a_row_stop_the_run():
    model = tiny_bert(seed=6)
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2, max_consecutive_skips=3))

    def nan_loss(module, batch):
        return module(**batch).loss * float("nan")

    bidrop.step(random_batch(0), loss_fn=nan_loss)
    assert not bidrop.step(random_batch(1)).skipped and bidrop.consecutive_skips == 0  # a good step resets
    for step in range(2):
        assert bidrop.step(random_batch(step), loss_fn=nan_loss).skipped
    with pytest.raises(SkipLimitError, match="3 steps in a row .*steps 2..4.*max_consecutive_skips"):
        bidrop.step(random_batch(4), loss_fn=nan_loss)
    assert bidrop.skipped_steps == 4
    never = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2, max_consecutive_skips=0))
    assert all(never.step(random_batch(s), loss_fn=nan_loss).skipped for s in range(12))


def test_kept_by_layer_counts_the_last_update():
    model = tiny_bert()
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(k=2, p=0.3, seed=1))
    bidrop.step(random_batch(1))
    with pytest.raises(RuntimeError, match="count_layers = True"):
        bidrop.kept_by_layer()
    bidrop.count_layers = True
    result = bidrop.step(random_batch(0))
    layers = bidrop.kept_by_layer()
    assert list(layers) == ["layer.0", "layer.1"]
    sizes = {name: sum(q.numel() for n, q in model.named_parameters() if f".{name}." in n) for name in layers}
    overall = sum(layers[name] * sizes[name] for name in layers) / sum(sizes.values())
    assert overall == pytest.approx(result.kept_fraction, abs=2e-3)  # exact zeros aside
    assert all(0.0 < fraction < 1.0 for fraction in layers.values())

"""Users' mistakes caught with a clear error (or one warning), on one process and on 2 real gloo
ranks: eval mode, passes that come out identical, a foreign optimizer, a batch without a loss, and
a construction failure on one rank, which must raise on every rank instead of leaving them waiting."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from bidrop_ds import BiDrop, BiDropConfig
from tests.distributed import run_distributed
from tests.models import random_batch, tiny_bert


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_model_in_eval_mode_is_refused_at_step_time():
    model = tiny_bert().eval()  # as from_pretrained returns it
    bidrop = BiDrop(model, sgd(model), BiDropConfig(k=2))
    with pytest.raises(RuntimeError, match=r"eval mode.*k = 2 passes would be identical.*call model.train\(\)"):
        bidrop.step(random_batch(0))
    model.train()
    assert not bidrop.step(random_batch(0)).skipped
    model.eval()  # an evaluation between steps, and no train() after it
    with pytest.raises(RuntimeError, match="eval mode"):
        bidrop.begin_step()
    vanilla = BiDrop(model, sgd(model), BiDropConfig(strategy="vanilla"))  # one pass: no dropout needed
    assert not vanilla.step(random_batch(0)).skipped


def test_identical_passes_are_warned_once(caplog):
    model = tiny_bert(dropout=0.1)
    for module in model.modules():  # dropout disabled inside the model; its config still says 0.1
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    bidrop = BiDrop(model, sgd(model), BiDropConfig(k=2, p=0.3))
    with caplog.at_level(logging.WARNING, logger="bidrop_ds"):
        for step in range(3):
            bidrop.step(random_batch(step))
    warnings = [r for r in caplog.records if "identical gradients" in r.getMessage()]
    assert len(warnings) == 1 and "step 0" in warnings[0].getMessage(), caplog.text
    caplog.clear()
    active = tiny_bert(dropout=0.1)
    bidrop = BiDrop(active, sgd(active), BiDropConfig(k=2, p=0.3))
    with caplog.at_level(logging.WARNING, logger="bidrop_ds"):
        bidrop.step(random_batch(0))
    assert "identical gradients" not in caplog.text


def test_an_optimizer_without_the_model_parameters_is_refused():
    model, other = tiny_bert(), tiny_bert()
    with pytest.raises(ValueError, match=r"does not hold the model's trainable parameter "
                                         r"'bert.embeddings.word_embeddings.weight' \(41 of 41"):
        BiDrop(model, sgd(other), BiDropConfig())
    with pytest.raises(ValueError, match=r"trainable parameter 'bert.embeddings.word_embeddings.weight' \(39 of 41"):
        BiDrop(model, torch.optim.SGD(model.classifier.parameters(), lr=0.1), BiDropConfig())
    for name, param in model.named_parameters():  # what is not trained is frozen: accepted
        param.requires_grad = name.startswith(("classifier", "bert.encoder"))
    BiDrop(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), BiDropConfig())


def test_a_batch_without_a_loss_names_labels_and_loss_fn():
    model = tiny_bert()
    bidrop = BiDrop(model, sgd(model), BiDropConfig(k=2))
    batch = random_batch(0)
    del batch["labels"]
    with pytest.raises(ValueError, match=r"no loss \(SequenceClassifierOutput .*`labels`.*\['input_ids'\].*loss_fn="):
        bidrop.step(batch)
    with pytest.raises(ValueError, match="loss_fn returned NoneType, not a loss tensor"):
        bidrop.step(random_batch(0), loss_fn=lambda model, batch: None)
    assert not bidrop.step(batch, loss_fn=lambda model, b: model(**b).logits.square().mean()).skipped


def _fail_on_one_rank(rank: int, world_size: int) -> list[str]:
    """Each setup fails on one rank only (an optimizer over another model's parameters; one given
    to a DeepSpeed engine); every rank must raise, then a healthy BiDrop must still step everywhere."""
    import deepspeed
    from torch.distributed.fsdp import fully_shard

    from tests.backends.zero_oracle import MICRO, ds_config

    def ddp(failing: int):
        model = DistributedDataParallel(tiny_bert())
        return BiDrop(model, sgd(tiny_bert() if rank == failing else model), BiDropConfig())

    def fsdp2(failing: int):
        model = fully_shard(tiny_bert())
        return BiDrop(model, sgd(tiny_bert() if rank == failing else model), BiDropConfig())

    def zero2(failing: int):
        model = tiny_bert()
        engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=sgd(model),
                                                     config=ds_config(2, "fp32", 1, world_size))
        try:
            return BiDrop(engine, optimizer if rank == failing else None, BiDropConfig())
        finally:
            engine.destroy()

    messages = []
    for build, failing in ((ddp, 1), (fsdp2, 0), (zero2, 1)):
        try:
            build(failing)
            messages.append("built")
        except (RuntimeError, ValueError) as err:
            messages.append(f"{type(err).__name__}: {err}")
    model = DistributedDataParallel(tiny_bert())
    messages.append(BiDrop(model, sgd(model), BiDropConfig(k=2)).step(random_batch(rank, size=MICRO)).loss)
    return messages


def test_a_construction_failure_on_one_rank_raises_on_every_rank():
    ddp, fsdp2, zero2, after = zip(*run_distributed(_fail_on_one_rank, world_size=2, timeout_s=300,
                                                    collective_timeout_s=60))
    foreign = "BiDrop: the optimizer does not hold the model's trainable parameter 'bert.embeddings"
    assert ddp[1].startswith(f"ValueError: {foreign}"), ddp
    assert ddp[0].startswith(f"RuntimeError: BiDrop: construction failed on rank 1: ValueError: {foreign}"), ddp
    assert fsdp2[0].startswith(f"ValueError: {foreign}"), fsdp2
    assert fsdp2[1].startswith(f"RuntimeError: BiDrop: construction failed on rank 0: ValueError: {foreign}"), fsdp2
    engine_note = "a DeepSpeed engine brings its own optimizer"
    assert zero2[1].startswith("ValueError: ") and engine_note in zero2[1], zero2
    assert zero2[0].startswith("RuntimeError: BiDrop: construction failed on rank 1: ValueError: ") and \
        engine_note in zero2[0], zero2
    assert all(isinstance(loss, float) and loss == loss for loss in after), after

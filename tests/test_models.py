"""bidrop_ds.models: dropout settings, pad tokens, the SFT loss, and decoder LLMs (a tiny Llama) under
ZeRO-3 bf16 on 2 gloo ranks against the float64 oracle: as a sequence classifier built inside
deepspeed.zero.Init (partitioned at construction, training equal to the model built whole) and as a
causal LM with the SFT loss through `loss_fn`; and a checkpoint whose head has another size, refused
under ZeRO-3. The 2-rank checks share one launch (`decoder_ranks`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, LlamaForSequenceClassification, PretrainedConfig

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.models import (IGNORE_INDEX, adamw, causal_lm_loss, classifier_config, dropout_rates, held_elements,
                              load_classifier, load_tokenizer, no_dropout_reason, set_dropout, sft_labels, zero3_init)
from tests.backends.zero_oracle import MICRO, assert_matches_oracle, check_step_against_oracle, ds_config, make_engine
from tests.distributed import run_distributed
from tests.models import VOCAB, padless_tokenizer, split_chunks, tiny_llama, tiny_llama_config


def test_dropout_settings_of_a_llama_config() -> None:
    config = tiny_llama_config(attention_dropout=0.0)
    assert dropout_rates(config) == {"attention_dropout": 0.0}
    assert no_dropout_reason(config) == "its only dropout setting is attention_dropout=0.0"
    assert set_dropout(config, 0.1) == {"attention_dropout": 0.1} and no_dropout_reason(config) is None
    bert = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # classifier_dropout None: left out
    assert no_dropout_reason(bert) == ("its only dropout settings are hidden_dropout_prob=0.0, "
                                       "attention_probs_dropout_prob=0.0")
    assert no_dropout_reason(PretrainedConfig()) is None  # no setting: only the modules can tell
    with pytest.raises(ValueError, match="has none of the dropout settings"):
        set_dropout(PretrainedConfig(), 0.1)


def test_a_decoder_classifier_gets_a_pad_token(tmp_path: Path) -> None:
    padless_tokenizer(["good", "bad"]).save_pretrained(tmp_path)
    tiny_llama_config(num_labels=3).save_pretrained(tmp_path)  # no pad_token_id
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2
    config = classifier_config(str(tmp_path), num_labels=2, pad_token_id=tokenizer.pad_token_id, dropout=0.1)
    assert (config.num_labels, config.pad_token_id, config.attention_dropout) == (2, 2, 0.1)


def test_the_decoder_layers_are_eligible_by_default() -> None:
    eligible = [name for name, _ in tiny_llama().named_parameters() if BiDropConfig().is_eligible(name)]
    others = [name for name, _ in tiny_llama().named_parameters() if not BiDropConfig().is_eligible(name)]
    assert eligible and all(name.startswith("model.layers.") for name in eligible)
    assert others == ["model.embed_tokens.weight", "model.norm.weight", "score.weight"]


def test_sft_labels_and_loss() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = sft_labels(ids, mask, prompt_lengths=torch.tensor([2, 1]))
    assert labels.tolist() == [[-100, -100, 7, 8, 9], [-100, 6, 7, -100, -100]]
    model = tiny_llama(causal_lm=True).eval()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # transformers' own shifted loss over the same labels: the tokens learned are the 5 not ignored
    assert causal_lm_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) == 5


def decoder_batch(seed: int, size: int, causal_lm: bool, length: int = 12) -> dict[str, torch.Tensor]:
    """Right-padded rows of random lengths (pad id 0); SFT labels (random prompt lengths) or classes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (size,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (size, length), generator=g).masked_fill(mask == 0, 0)
    labels = (sft_labels(ids, mask, torch.randint(1, 4, (size,), generator=g)) if causal_lm
              else torch.randint(0, 2, (size,), generator=g))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _decoder_scenarios(rank: int, world_size: int, folder: str) -> dict:
    """ZeRO-3 bf16, k=2: the classifier from `folder` built inside zero.Init and then built whole, 2 steps
    each on the same chunks; the causal LM with the SFT loss, 2 steps. Each step against the oracle."""
    config = BiDropConfig(k=2, p=0.3, seed=11)
    chunks = 2
    ds = ds_config(3, "bf16", chunks, world_size)
    out: dict = {"rows": []}

    def train(model, causal_lm: bool) -> torch.Tensor:
        engine = make_engine(3, "bf16", chunks, model=model.train())  # from_pretrained gives eval mode
        bidrop = BiDrop(engine, config=config)
        for step in range(2):
            batch = decoder_batch(100 * rank + step, MICRO * chunks, causal_lm)
            row, passes = check_step_against_oracle(bidrop, split_chunks(batch, chunks), config,
                                                    loss_fn=causal_lm_loss if causal_lm else None)
            row["passes_differ"] = not torch.equal(passes[0], passes[1])  # attention dropout is on
            out["rows"].append({"causal_lm": causal_lm, "step": step, **row})
        master = bidrop.backend.master_snapshot().clone()
        engine.destroy()
        return master

    with zero3_init(ds) as active:
        assert active
        partitioned = load_classifier(folder, classifier_config(folder, num_labels=2))
    out["partitioned_held"], out["total"] = held_elements(partitioned)
    out["local_numel"] = sum(p.numel() for p in partitioned.parameters())  # ZeRO-3 leaves empty tensors
    out["decay_groups"] = [len(group["params"]) for group in adamw(partitioned, 1e-3, 0.01).param_groups]
    whole = load_classifier(folder, classifier_config(folder, num_labels=2))
    out["whole_held"], _ = held_elements(whole)
    out["whole_decay_groups"] = [len(group["params"]) for group in adamw(whole, 1e-3, 0.01).param_groups]
    out["masters_equal"] = bool(torch.equal(train(partitioned, False), train(whole, False)))
    train(tiny_llama(seed=1, causal_lm=True), True)
    return out


def _load_a_head_of_another_size(rank: int, world_size: int, folder: str) -> str:
    """The 3-label checkpoint in `folder` as a 2-label classifier inside zero.Init: the ValueError's message."""
    with zero3_init(ds_config(3, "fp32", 1, world_size)), pytest.raises(ValueError) as refused:
        load_classifier(folder, classifier_config(folder, num_labels=2))
    return str(refused.value)


def _decoder_launch(rank: int, world_size: int, folder: str, three_labels: str) -> dict:
    """`_decoder_scenarios`, then the refusal of `three_labels` (each rank's message under "head_refusal")."""
    out = _decoder_scenarios(rank, world_size, folder)
    out["head_refusal"] = _load_a_head_of_another_size(rank, world_size, three_labels)
    return out


@pytest.fixture(scope="module")
def decoder_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """One 2-rank launch: `_decoder_scenarios` on a saved tiny Llama, then the refused 3-label checkpoint
    (returned with the per-rank results: the error names its folder)."""
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    folder, three_labels = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("llama_3_labels")
    tiny_llama(seed=0).save_pretrained(folder)  # attention_dropout 0.2, pad_token_id 0
    LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).save_pretrained(three_labels)
    ranks = run_distributed(_decoder_launch, world_size=2, timeout_s=600, folder=str(folder),
                            three_labels=str(three_labels))
    return ranks, three_labels


def test_llama_under_zero3_bf16_matches_oracle(decoder_ranks: tuple[list[dict], Path]) -> None:
    ranks, _ = decoder_ranks
    for out in ranks:
        # built partitioned: this rank held about half of the model from the start, nothing in the tensors
        assert out["partitioned_held"] <= out["total"] // 2 + 64 and out["local_numel"] == 0, out
        assert out["whole_held"] == out["total"]
        assert out["decay_groups"] == out["whole_decay_groups"]  # judged by the full shape (ds_shape)
        assert out["masters_equal"]  # same weights, same steps: equal fp32 masters, bit for bit
        assert [(row["causal_lm"], row["step"]) for row in out["rows"]] == [
            (False, 0), (False, 1), (False, 0), (False, 1), (True, 0), (True, 1)]
        for row in out["rows"]:
            assert_matches_oracle(row, bound=1e-5)
            assert row["passes_differ"], row


def test_zero3_head_of_another_size_is_refused(decoder_ranks: tuple[list[dict], Path]) -> None:
    """transformers' ZeRO-3 loader replaces no head (and 4.x's `ignore_mismatched_sizes` would take every
    partitioned weight for mismatched): a one-line ValueError on every rank, on 4.x and 5.x alike."""
    ranks, folder = decoder_ranks
    for out in ranks:
        assert out["head_refusal"] == (f"{folder}: under ZeRO-3 the checkpoint's head must have num_labels=2 outputs "
                                       "(transformers' ZeRO-3 loader replaces no head); save the model with the "
                                       "new head once without ZeRO-3 and load that")

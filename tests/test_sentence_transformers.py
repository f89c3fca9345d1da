"""The sentence-transformers drop-ins (`smooth_infonce.integrations.sentence_transformers`): at
smoothing 0 they are the library's MultipleNegativesRankingLoss and its cached variant in value and
in the gradients of every column, in float64 (pairs and hard-negative columns, cos_sim and
dot_score, the default and the symmetric directions, one process and 2 gloo processes with
gather_across_devices); every other setting is refused by name; with smoothing each direction is
the written-out loss; the cached loss gives the uncached one; both train a tiny model built here
(a `tokenizers` tokenizer, a static embedding or a one-layer BERT) with the library's trainer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers import util as st_util
from sentence_transformers.base.modules import Transformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling, StaticEmbedding
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from smooth_infonce import SmoothingSchedule
from smooth_infonce.integrations.sentence_transformers import (
    CachedSmoothMultipleNegativesRankingLoss,
    SmoothMultipleNegativesRankingLoss,
)

from integration_helpers import free_port
from oracles import loop_oracle

WORLD, BATCH, WIDTH = 2, 4, 8
SYMMETRIC = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
WORDS = ("the a cat dog bird sits runs flies on mat park tree red blue green small big old young "
         "house car road river sky sun").split()


def word_tokenizer() -> Tokenizer:
    """A word-level tokenizer made here with `tokenizers` (no download)."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def static_model(dim=16, seed=0) -> SentenceTransformer:
    torch.manual_seed(seed)
    return SentenceTransformer(modules=[StaticEmbedding(word_tokenizer(), embedding_dim=dim)], device="cpu")


def bert_model(folder, dim=16, seed=0) -> SentenceTransformer:
    """A one-layer BERT (no dropout) with mean pooling, saved to ``folder`` and loaded as a module."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 4, hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * dim, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), pad_token="[PAD]", unk_token="[UNK]",
                            cls_token="[CLS]", sep_token="[SEP]").save_pretrained(folder)
    return SentenceTransformer(modules=[Transformer(str(folder)), Pooling(dim, "mean")], device="cpu")


@pytest.fixture(scope="module")
def model():
    return static_model()


def columns(count=3, rows=5, width=WIDTH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g, dtype=torch.float64) for _ in range(count)]


def loss_and_grads(loss, embeddings):
    leaves = [e.clone().requires_grad_() for e in embeddings]
    value = loss.compute_loss_from_embeddings(leaves, None)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def assert_same(got, expected):
    (value, grads), (expected_value, expected_grads) = got, expected
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


# --- one process, embeddings in --------------------------------------------------------------

SETTINGS = [
    dict(),
    dict(scale=7.0, similarity_fct=st_util.dot_score),
    dict(partition_mode="per_direction"),
    SYMMETRIC,
    dict(SYMMETRIC, similarity_fct=st_util.dot_score, scale=3.0),
    dict(hardness_mode="hard_negatives", hardness_strength=0.0),  # no hardness weighting: accepted
    dict(gather_across_devices=True),  # one process: nothing to gather, as the library
]


@pytest.mark.filterwarnings("ignore:a row has only")  # one row: fewer negatives than k, as intended
@pytest.mark.parametrize("settings", SETTINGS, ids=str)
@pytest.mark.parametrize("count, rows", [(2, 5), (4, 5), (2, 1), (3, 1)])
@pytest.mark.parametrize("neighbors", [None, 3])
def test_smoothing_zero_is_the_library_loss(model, settings, count, rows, neighbors):
    embeddings = columns(count, rows)
    got = loss_and_grads(SmoothMultipleNegativesRankingLoss(model, neighbors=neighbors, **settings), embeddings)
    assert_same(got, loss_and_grads(MultipleNegativesRankingLoss(model, **settings), embeddings))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("neighbors", [None, 1, 3])
def test_smoothed_loss_is_the_written_out_loss(model, symmetric, neighbors):
    """query_to_doc: each query against every positive and hard negative, its own positive the one
    positive, smoothing onto its nearest negatives; doc_to_query: each positive against every query;
    symmetric: the mean (tests/oracles.py writes each row out)."""
    embeddings = columns(3, 6)
    settings = SYMMETRIC if symmetric else {}
    loss = SmoothMultipleNegativesRankingLoss(model, scale=10.0, smoothing=0.3, neighbors=neighbors, **settings)
    value = loss.compute_loss_from_embeddings(embeddings, None)
    queries, positives = embeddings[0], embeddings[1]
    kw = dict(temperature=0.1, smoothing=0.3, neighbors=neighbors)
    expected = loop_oracle(queries, torch.cat(embeddings[1:]), lambda i, j: True, lambda i, j: i == j, **kw).mean()
    if symmetric:
        backward = loop_oracle(positives, queries, lambda i, j: True, lambda i, j: i == j, **kw).mean()
        expected = (expected + backward) / 2
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    plain = MultipleNegativesRankingLoss(model, scale=10.0, **settings).compute_loss_from_embeddings(embeddings, None)
    assert not torch.isclose(value, plain)


@pytest.mark.parametrize("settings, match", [
    (dict(directions=("query_to_doc", "query_to_query")), r"\['query_to_query'\]"),
    (dict(directions=("query_to_doc", "doc_to_doc", "doc_to_query")), r"\['doc_to_doc'\]"),
    (dict(directions=("query_to_doc", "doc_to_query")), "partition_mode='joint'"),
    (dict(hardness_mode="in_batch_negatives", hardness_strength=9.0), "hardness_mode='in_batch_negatives'"),
    (dict(similarity_fct=st_util.euclidean_sim), "similarity_fct=euclidean_sim"),
])
@pytest.mark.parametrize("cls", [SmoothMultipleNegativesRankingLoss, CachedSmoothMultipleNegativesRankingLoss])
def test_unsupported_settings_are_refused_by_name(cls, settings, match, tmp_path):
    target = static_model() if cls is SmoothMultipleNegativesRankingLoss else bert_model(tmp_path)
    with pytest.raises(ValueError, match=match):
        cls(target, smoothing=0.1, **settings)


def test_a_setting_changed_after_construction_is_refused_at_the_call(model):
    loss = SmoothMultipleNegativesRankingLoss(model, smoothing=0.1)
    loss.directions = ("query_to_doc", "query_to_query")
    with pytest.raises(ValueError, match="query_to_query"):
        loss.compute_loss_from_embeddings(columns(2), None)
    loss = SmoothMultipleNegativesRankingLoss(model)
    loss.scale = 5.0  # an assigned scale is the temperature of the next call
    torch.testing.assert_close(loss.compute_loss_from_embeddings(columns(2), None),
                               MultipleNegativesRankingLoss(model, scale=5.0).compute_loss_from_embeddings(columns(2),
                                                                                                          None))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(smoothing=1.5), ValueError, "smoothing must be in"),
    (dict(neighbors=0), ValueError, "neighbors must be"),
    (dict(validate="yes"), TypeError, "validate must be a bool"),
    (dict(scale=-1.0), ValueError, "[Ss]cale"),  # the library's own check
])
def test_constructor_errors_name_the_argument(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        SmoothMultipleNegativesRankingLoss(model, **kwargs)


def test_call_errors_name_the_column(model):
    loss = SmoothMultipleNegativesRankingLoss(model, smoothing=0.1)
    embeddings = columns(3)
    with pytest.raises(ValueError, match="column 2"):
        loss.compute_loss_from_embeddings([embeddings[0], embeddings[1], embeddings[2][:-1]], None)
    with pytest.raises(ValueError, match="at least 2 columns"):
        loss.compute_loss_from_embeddings(embeddings[:1], None)
    embeddings[1][0, 0] = float("inf")
    with pytest.raises(ValueError, match="column_1"):
        loss.compute_loss_from_embeddings(embeddings, None)


def test_schedule_set_epoch_and_config(model):
    loss = SmoothMultipleNegativesRankingLoss(model, neighbors=2,
                                              schedule=SmoothingSchedule(0.2, "warmup", warmup_epochs=1))
    embeddings = columns(2)
    library = MultipleNegativesRankingLoss(model).compute_loss_from_embeddings(embeddings, None)
    torch.testing.assert_close(loss.compute_loss_from_embeddings(embeddings, None), library)
    assert loss.set_epoch(1) == 0.2
    smoothed = SmoothMultipleNegativesRankingLoss(model, smoothing=0.2, neighbors=2)
    torch.testing.assert_close(loss.compute_loss_from_embeddings(embeddings, None),
                               smoothed.compute_loss_from_embeddings(embeddings, None))
    assert loss.get_config_dict()["smoothing"] == 0.2 and loss.get_config_dict()["neighbors"] == 2
    assert loss.get_config_dict()["scale"] == 20.0
    with pytest.raises(RuntimeError, match="set_epoch needs a schedule"):
        smoothed.set_epoch(1)


def test_without_sentence_transformers_the_import_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['sentence_transformers'] = None\n"
            "import smooth_infonce.integrations.sentence_transformers\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "pip install 'smooth-infonce[sentence-transformers]'" in done.stderr, done.stderr[-2000:]


# --- the cached loss ------------------------------------------------------------------------------

def reps_of(embeddings, mini_batch_size):
    """The cached loss's input: each column as its mini-batches' embedding leaves."""
    return [[part.clone().requires_grad_() for part in column.split(mini_batch_size)] for column in embeddings]


@pytest.mark.parametrize("settings", [dict(), SYMMETRIC], ids=["query_to_doc", "symmetric"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cached_calculate_loss_is_the_uncached_loss(model, tmp_path, settings, smoothing):
    """calculate_loss, mini-batch by mini-batch (7 rows in parts of 3), gives the uncached loss and,
    back-propagated part by part, the gradient of every embedding."""
    embeddings = columns(3, 7)
    cached = CachedSmoothMultipleNegativesRankingLoss(bert_model(tmp_path), mini_batch_size=3, smoothing=smoothing,
                                                      neighbors=2, **settings)
    reps = reps_of(embeddings, 3)
    value = cached.calculate_loss(reps, None, with_backward=True)
    assert not value.requires_grad
    expected_value, expected_grads = loss_and_grads(
        SmoothMultipleNegativesRankingLoss(model, smoothing=smoothing, neighbors=2, **settings), embeddings)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)
    for column, expected_grad in zip(reps, expected_grads):
        torch.testing.assert_close(torch.cat([part.grad for part in column]), expected_grad, rtol=1e-10, atol=1e-12)
    no_backward = cached.calculate_loss(reps_of(embeddings, 3), None)  # evaluation: no backward
    torch.testing.assert_close(no_backward.detach(), expected_value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("settings", [dict(), SYMMETRIC], ids=["query_to_doc", "symmetric"])
def test_cached_loss_through_a_model_is_the_library_loss(tmp_path, settings):
    """A float64 one-layer BERT, a batch of 5 (anchor, positive, negative) texts: the cached smoothed
    loss at smoothing 0 (mini-batches of 2) has the value and parameter gradients of the library's
    cached and uncached losses; smoothed, those of the uncached smoothed loss."""
    model = bert_model(tmp_path).double()
    texts = [["the cat sits on the mat", "a dog runs in the park", "a bird flies", "red car on the road",
              "the sun in the sky"],
             ["a cat on a mat", "the dog runs", "the small bird flies", "a red car", "the sky and sun"],
             ["blue river", "an old house", "green tree", "young dog", "big road"]]
    features = [model.tokenize(column) for column in texts]

    def run(loss):
        model.zero_grad()
        value = loss([dict(f) for f in features], None)
        value.backward()
        return value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    library = run(MultipleNegativesRankingLoss(model, **settings))
    library_cached = run(CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, **settings))
    ours = run(CachedSmoothMultipleNegativesRankingLoss(model, mini_batch_size=2, **settings))
    for reference in (library, library_cached):
        assert_same(ours, reference)
    smoothed = run(CachedSmoothMultipleNegativesRankingLoss(model, mini_batch_size=2, smoothing=0.2, neighbors=2,
                                                            **settings))
    assert_same(smoothed, run(SmoothMultipleNegativesRankingLoss(model, smoothing=0.2, neighbors=2, **settings)))
    assert not torch.isclose(smoothed[0], ours[0])


# --- training with the library's trainer -------------------------------------------------------------

def train(model, loss, tmp_path, rows=16, batch=4):
    """A few steps of SentenceTransformerTrainer on (anchor, positive, negative) texts made here."""
    colours, things = ["red", "blue", "green", "small", "big", "old", "young", "the"], ["cat", "dog", "bird", "car"]
    data = {"anchor": [], "positive": [], "negative": []}
    for i in range(rows):
        colour, thing = colours[i % 8], things[i % 4]
        data["anchor"].append(f"the {colour} {thing} sits on the mat")
        data["positive"].append(f"a {colour} {thing} on a mat")
        data["negative"].append(f"the {colours[(i + 3) % 8]} {things[(i + 1) % 4]} flies over the river")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=batch, learning_rate=0.05,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), loss=loss)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    moved = [not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)]
    return losses, moved


def test_trains_a_static_embedding_model_with_the_library_trainer(tmp_path):
    model = static_model(dim=32)
    losses, moved = train(model, SmoothMultipleNegativesRankingLoss(model, smoothing=0.1, neighbors=2), tmp_path)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] and all(moved), losses


def test_trains_a_tiny_bert_with_the_cached_loss(tmp_path):
    model = bert_model(tmp_path / "bert", dim=32)
    loss = CachedSmoothMultipleNegativesRankingLoss(model, mini_batch_size=2, smoothing=0.1, neighbors=2, **SYMMETRIC)
    losses, moved = train(model, loss, tmp_path)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(moved) > len(moved) // 2, moved  # the BERT's parameters the batch reaches all move


# --- two gloo processes, gather_across_devices ------------------------------------------------------

def rank_results(rank, model):
    """Per setting and smoothing: this rank's (ours, library's) loss and column gradients, and the
    cached loss's (calculate_loss in mini-batches of 3 rows) value and column gradients."""
    embeddings = columns(3, WORLD * BATCH)
    mine = [e[rank * BATCH:(rank + 1) * BATCH] for e in embeddings]
    results = {}
    for name, settings in (("query_to_doc", {}), ("symmetric", SYMMETRIC)):
        for smoothing in (0.0, 0.2):
            kw = dict(gather_across_devices=True, smoothing=smoothing, neighbors=3, **settings)
            ours = loss_and_grads(SmoothMultipleNegativesRankingLoss(model, **kw), mine)
            library = loss_and_grads(MultipleNegativesRankingLoss(model, gather_across_devices=True, **settings), mine)
            # calculate_loss never calls the model: a stand-in the library accepts for mini-batching
            cached = CachedSmoothMultipleNegativesRankingLoss(torch.nn.Sequential(torch.nn.Identity()),
                                                              mini_batch_size=3, **kw)
            reps = reps_of(mine, 3)
            value = cached.calculate_loss(reps, None, with_backward=True)
            results[(name, smoothing)] = (ours, library, (value, [torch.cat([p.grad for p in c]) for c in reps]))
    return results


def worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(rank_results(rank, static_model()), os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("st_ranks")
    mp.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["query_to_doc", "symmetric"])
def test_two_processes_smoothing_zero_is_the_library_loss(two_ranks, name):
    for results in two_ranks:
        ours, library, cached = results[(name, 0.0)]
        assert_same(ours, library)
        assert_same(cached, library)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["query_to_doc", "symmetric"])
def test_two_processes_smoothed_against_one_process(model, two_ranks, name):
    """Each rank's anchors against every rank's candidates: the rank losses average to the loss of
    the whole batch in one process, and each rank's column gradients are world_size times the
    whole-batch gradients of its rows (the gather sums every rank's gradient into its owner, as the
    library's); the cached loss gives the same on every rank."""
    settings = SYMMETRIC if name == "symmetric" else {}
    loss, grads = loss_and_grads(SmoothMultipleNegativesRankingLoss(model, smoothing=0.2, neighbors=3, **settings),
                                 columns(3, WORLD * BATCH))
    torch.testing.assert_close(sum(results[(name, 0.2)][0][0] for results in two_ranks) / WORLD, loss)
    for rank, results in enumerate(two_ranks):
        ours, _, cached = results[(name, 0.2)]
        assert_same(cached, ours)
        for rank_grad, grad in zip(ours[1], grads):
            torch.testing.assert_close(rank_grad, WORLD * grad[rank * BATCH:(rank + 1) * BATCH])

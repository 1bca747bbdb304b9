"""data.streaming=true: the stream gives the map-style path's examples and step target counts, a seeded
order, an exact continuation from a saved state, and refuses what it cannot honour."""

from __future__ import annotations

import csv
import io
import itertools
import json

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import ModelCheckpoint

from sftlab import build
from sftlab.config import streaming_problems, validate
from sftlab.data.sampler import StepPlanSampler
from sftlab.errors import ConfigError, DataError
from sftlab.model.adapters import LoRA
from sftlab.model.load import load_model
from sftlab.training.module import SFTModule
from tests.conftest import ISO_DATA, ROOT, quiet_trainer


@pytest.fixture(scope="module")
def data_cfg(tiny_cfg):
    return tiny_cfg.data


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """30 ISO-date rows, plus a row that truncation=drop drops and a line that is not JSON."""
    path = tmp_path_factory.mktemp("stream") / "train.jsonl"
    lines = (ISO_DATA / "train.jsonl").read_text().splitlines()[:30]
    long = {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]}
    lines[7:7] = [json.dumps(long), "{not json"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _dm(data_cfg, tokenizer, chatml, train_file, **overrides):
    settings = {
        "train_path": str(train_file),
        "val_path": None,
        "test_path": None,
        "cache_dir": None,
        "num_proc": 1,
        "batch_size": 3,
        "max_length": 128,
        "truncation": "drop",
        "on_error": "skip",
        "max_drop_ratio": 1.0,
        "streaming": True,
        **overrides,
    }
    dm = instantiate(data_cfg, _partial_=True, **settings)(tokenizer=tokenizer, template=chatml)
    dm.setup("fit")
    return dm


def _micro_batches(dm, accumulate=1, epoch=0, world_size=1, rank=0):
    dm.stream.configure(accumulate=accumulate, world_size=world_size, rank=rank, epoch_of=lambda: epoch)
    return list(dm.stream)


def _ids(micro_batches):
    return [[f["index"] for f in mb] for mb in micro_batches]


def test_stream_gives_the_map_style_examples_and_step_targets(data_cfg, tokenizer, chatml, train_file):
    """Unshuffled, the stream is the map-style split in order: the same token ids, labels, counts, and the
    same micro-batches with the same per-step target totals as StepPlanSampler's plan."""
    mapped = _dm(data_cfg, tokenizer, chatml, train_file, streaming=False, shuffle=False)
    streamed = _dm(data_cfg, tokenizer, chatml, train_file, shuffle=False)
    got = _micro_batches(streamed, accumulate=2)
    examples = mapped.splits["train"].examples
    flat = [f for mb in got for f in mb]
    assert len(flat) == len(examples) == 30
    for k, (f, ex) in enumerate(zip(flat, examples, strict=True)):
        assert f["input_ids"] == list(ex.input_ids) and f["labels"] == list(ex.labels), k
    # Ordinals of the stream count the rows read (the dropped long row and the bad line included).
    row_of = [i for i in range(32) if i not in (7, 8)]
    plan = StepPlanSampler(
        mapped.splits["train"].num_targets, batch_size=3, accumulate=2, shuffle=False
    ).plan()
    assert [[(row_of[i], t) for i, t in mb] for mb in plan] == [
        [(f["index"], f["step_targets"]) for f in mb] for mb in got
    ]
    assert streamed.counts()["train"] == mapped.counts()["train"]
    assert streamed.counts()["train"]["dropped"] == {"too_long": 1}
    assert streamed.counts()["train"]["skipped"] == {"bad_json": 1}


def test_order_is_seeded_and_each_epoch_is_a_permutation(data_cfg, tokenizer, chatml, train_file):
    def order(seed, epoch=0):
        dm = _dm(data_cfg, tokenizer, chatml, train_file, seed=seed, shuffle_buffer=8)
        return [i for mb in _ids(_micro_batches(dm, epoch=epoch)) for i in mb]

    first = order(0)
    kept = [i for i in range(32) if i not in (7, 8)]
    assert sorted(first) == kept and first != kept
    assert order(0) == first
    assert order(1) != first
    assert order(0, epoch=1) == order(1)  # the seed of epoch e is data.seed + e


def _roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), as a Lightning checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_a_saved_state_continues_the_stream_exactly(data_cfg, tokenizer, chatml, train_file, packing):
    """The stream runs ahead of training (Lightning fetches the next micro-batch); a state saved after
    `consumed` trained micro-batches, loaded into a fresh datamodule, yields exactly the rest, mid-step and
    at a step boundary, with the shuffle buffer and (packing) the carried-over examples restored."""
    settings = {"shuffle_buffer": 8, "packing": packing, "max_length": 96 if packing else 128}
    reference = _micro_batches(_dm(data_cfg, tokenizer, chatml, train_file, **settings), accumulate=2)
    assert len(reference) >= 6
    for consumed in (3, 4):
        dm = _dm(data_cfg, tokenizer, chatml, train_file, **settings)
        dm.stream.configure(accumulate=2, world_size=1, rank=0, epoch_of=lambda: 0)
        it = iter(dm.stream)
        for _ in range(consumed + 1):  # trained, plus the one fetched ahead
            next(it)
        state = _roundtrip(dm.stream.state_dict(0, consumed))
        resumed = _dm(data_cfg, tokenizer, chatml, train_file, **settings)
        resumed.stream.load_state_dict(state)
        assert _micro_batches(resumed, accumulate=2) == reference[consumed:], consumed
        assert resumed.counts()["train"]["rows"] == 32
    # Saved at the end of the pass, once Lightning counts the next epoch: the next pass starts afresh.
    assert dm.stream.state_dict(1, len(reference)) == {}


def test_val_size_holds_out_the_first_rows_and_every_pass_starts_after_them(
    data_cfg, tokenizer, chatml, train_file
):
    """The first 5 rows are the validation split, encoded as the map-style path encodes them; no pass of the
    stream trains them, and a state saved mid-pass continues after them too."""
    dm = _dm(data_cfg, tokenizer, chatml, train_file, val_size=5, shuffle_buffer=4)
    mapped = _dm(data_cfg, tokenizer, chatml, train_file, streaming=False, shuffle=False)
    val = dm.splits["val"].examples
    assert [(e.input_ids, e.labels) for e in val] == [
        (e.input_ids, e.labels) for e in mapped.splits["train"].examples[:5]
    ]
    assert dm.counts()["val"]["rows"] == 5
    for epoch in (0, 1):
        ids = [i for mb in _ids(_micro_batches(dm, epoch=epoch)) for i in mb]
        assert sorted(ids) == [i for i in range(5, 32) if i not in (7, 8)], epoch
    reference = _micro_batches(dm)
    it = iter(dm.stream)
    next(it), next(it)
    resumed = _dm(data_cfg, tokenizer, chatml, train_file, val_size=5, shuffle_buffer=4)
    resumed.stream.load_state_dict(_roundtrip(dm.stream.state_dict(0, 1)))
    assert _micro_batches(resumed) == reference[1:]


def test_a_state_of_another_order_or_kind_is_refused(data_cfg, tokenizer, chatml, train_file):
    dm = _dm(data_cfg, tokenizer, chatml, train_file, shuffle_buffer=8)
    dm.stream.configure(accumulate=1, world_size=1, rank=0, epoch_of=lambda: 0)
    next(iter(dm.stream))
    state = dm.stream.state_dict(0, 0)
    other = _dm(data_cfg, tokenizer, chatml, train_file, shuffle_buffer=16)
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer: 8 in the checkpoint, 16 now"):
        other.load_state_dict({"stream": state})
    mapped = _dm(data_cfg, tokenizer, chatml, train_file, streaming=False)
    with pytest.raises(
        ConfigError, match=r"written with data.streaming=True; a launch with data.streaming=False"
    ):
        mapped.load_state_dict({"stream": state})


@pytest.fixture(scope="module")
def alpaca_files(tmp_path_factory):
    """The same 20 alpaca rows as JSONL, CSV and parquet (read through datasets' streaming builder, the hub
    path's reader)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("formats")
    rows = [
        {"instruction": f"Spell {i} in words.", "input": "", "output": f"The number {i}."} for i in range(20)
    ]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(folder / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), folder / "rows.parquet", row_group_size=7)
    return {suffix: folder / f"rows.{suffix}" for suffix in ("jsonl", "csv", "parquet")}


def test_every_reader_streams_the_same_examples_and_resumes_exactly(
    data_cfg, tokenizer, chatml, alpaca_files
):
    def stream(path, state=None):
        dm = _dm(data_cfg, tokenizer, chatml, path, shuffle_buffer=4, batch_size=2)
        if state is not None:
            dm.stream.load_state_dict(state)
        return dm, _micro_batches(dm, accumulate=2)

    _, reference = stream(alpaca_files["jsonl"])
    assert len(reference) == 10
    for suffix in ("csv", "parquet"):
        dm, got = stream(alpaca_files[suffix])
        assert got == reference, suffix
        it = iter(dm.stream)
        for _ in range(6):
            next(it)
        _, resumed = stream(alpaca_files[suffix], _roundtrip(dm.stream.state_dict(0, 5)))
        assert resumed == reference[5:], suffix


def test_packed_stream_keeps_every_example_once_within_max_length(data_cfg, tokenizer, chatml, train_file):
    unpacked = _micro_batches(_dm(data_cfg, tokenizer, chatml, train_file, shuffle=False))
    packed = _micro_batches(_dm(data_cfg, tokenizer, chatml, train_file, shuffle=False, packing=True))
    rows = [f for mb in packed for f in mb]
    assert all(len(f["input_ids"]) <= 128 for f in rows) and len(rows) < 30
    pieces = []
    for f in rows:  # cut each packed row where its position ids restart
        starts = [k for k, p in enumerate(f["position_ids"]) if p == 0] + [len(f["input_ids"])]
        pieces += [(f["input_ids"][a:b], f["labels"][a:b]) for a, b in itertools.pairwise(starts)]
    expected = [(f["input_ids"], f["labels"]) for mb in unpacked for f in mb]
    assert sorted(pieces) == sorted(expected)
    for mb in packed:  # the step total is the targets of the step's packed rows
        assert mb[0]["step_targets"] > 0


def test_ranks_split_each_step_between_them(data_cfg, tokenizer, chatml, train_file):
    one = _ids(_micro_batches(_dm(data_cfg, tokenizer, chatml, train_file, batch_size=2), world_size=1))
    ranks = [
        _ids(_micro_batches(_dm(data_cfg, tokenizer, chatml, train_file, batch_size=1), world_size=2, rank=r))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for whole, a, b in zip(one, *ranks, strict=True):
        assert sorted(a + b) == sorted(whole)


def test_a_json_array_is_refused_with_the_conversion(data_cfg, tokenizer, chatml, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}]))
    with pytest.raises(DataError, match=r"cannot be streamed.*jq -c '\.\[\]' rows\.json > rows\.jsonl"):
        _dm(data_cfg, tokenizer, chatml, path)


def test_strict_mode_names_the_bad_line_before_training(data_cfg, tokenizer, chatml, train_file):
    """The first rows are read at setup (the preview), so a bad line there stops the run before the model
    loads; further on, the stream raises the same message when it reaches the line."""
    with pytest.raises(DataError, match=rf"{train_file}:9: invalid JSON"):
        _dm(data_cfg, tokenizer, chatml, train_file, on_error="raise")


def _problems(overrides):
    with pytest.raises(ConfigError) as info:
        validate(*build.compose_with_origin(["model=tiny_random", *overrides], output_dir="/tmp/unused"))
    return str(info.value)


def test_streaming_without_max_steps_is_refused_naming_the_files():
    """Also: a fractional validation interval, and data.val_size beside data.val_path (the default data has
    one). A valid data.val_size command is in docs/streaming.md, which tests/test_docs.py validates."""
    message = _problems(["data.streaming=true", "data.val_size=100", "trainer.val_check_interval=0.5"])
    assert "(3 problem(s))" in message
    assert (
        f"trainer.max_steps ({ROOT}/conf/trainer/default.yaml or the command line; data.streaming=true in "
        in (message)
    )
    assert f"{ROOT}/conf/data/default.yaml or the command line)" in message
    assert "set trainer.max_steps=<steps>" in message
    assert "trainer.val_check_interval" in message and "a number of micro-batches" in message
    assert "data.val_size (" in message and "and so does data.val_path: keep one of them" in message


def test_streaming_refuses_what_a_stream_cannot_honour():
    message = _problems(
        [
            "data=jsonl",
            "data.train_path=/tmp/big.jsonl",
            "data.streaming=true",
            "data.dedupe=true",
            "data.group_by_length=true",
            "data.num_workers=2",
            "trainer.max_steps=100",
            "trainer.val_check_interval=50",
        ]
    )
    for key in ("data.val_fraction", "data.dedupe", "data.group_by_length", "data.num_workers"):
        assert f"  - {key} (" in message, key
    assert "set data.val_size=<rows> (the first rows held out) or data.val_path" in message
    assert "trainer.max_steps" not in message


def test_val_size_needs_streaming():
    assert streaming_problems({"val_size": 100}, None) == [
        (
            "data.val_size",
            "holds out the first rows of a stream; without data.streaming=true use data.val_fraction.",
        )
    ]
    assert streaming_problems({"val_size": -1, "streaming": True}, None)[0][0] == "data.val_size"
    assert streaming_problems({"val_size": 100, "streaming": True}, None) == []


def test_the_datamodule_refuses_them_too(data_cfg, tokenizer, chatml, train_file):
    with pytest.raises(ConfigError, match=r"data.dedupe: not with data.streaming=true"):
        _dm(data_cfg, tokenizer, chatml, train_file, dedupe=True)


class _Record(pl.Callback):
    """(optimizer steps done, sample ids, loss) of every trained micro-batch; raises after `stop_after` of
    them."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.batches, self.stop_after = [], stop_after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append((trainer.global_step, batch["index"].tolist(), float(outputs["loss"])))
        if len(self.batches) == self.stop_after:
            raise _Killed


class _Killed(Exception):
    pass


def _fit(tiny_cfg, tiny_model_dir, dm, record, ckpt_dir, ckpt_path=None):
    torch.manual_seed(0)  # LoRA A is initialised from the global RNG: the same start in every run
    model = LoRA(r=4, lora_alpha=8, lora_dropout=0.0).apply(load_model(tiny_cfg.model, tiny_model_dir))
    module = SFTModule(model, optimizer=instantiate(tiny_cfg.optimizer))
    save = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(
        [record, save], max_steps=4, accumulate_grad_batches=2, limit_val_batches=0, precision="32-true"
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)


def test_lightning_resume_mid_run_trains_the_same_micro_batches(
    data_cfg, tokenizer, chatml, train_file, tiny_cfg, tiny_model_dir, tmp_path
):
    """In process, through Lightning's checkpoint: stopped after step 3, resumed from the save after step 2
    (the stream had run a micro-batch ahead), the run trains the uninterrupted run's micro-batches and
    losses, across the end of the first pass (12 rows: 6 micro-batches of 2)."""
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join((ISO_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:12]))
    settings = {"batch_size": 2, "shuffle_buffer": 4}
    reference = _Record()
    _fit(
        tiny_cfg,
        tiny_model_dir,
        _dm(data_cfg, tokenizer, chatml, train_file, **settings),
        reference,
        tmp_path / "a",
    )
    stopped = _Record(stop_after=6)  # 3 steps
    with pytest.raises(_Killed):
        _fit(
            tiny_cfg,
            tiny_model_dir,
            _dm(data_cfg, tokenizer, chatml, train_file, **settings),
            stopped,
            tmp_path / "b",
        )
    resumed = _Record()
    dm = _dm(data_cfg, tokenizer, chatml, train_file, **settings)
    _fit(tiny_cfg, tiny_model_dir, dm, resumed, tmp_path / "c", ckpt_path=tmp_path / "b" / "step=2.ckpt")
    assert len(reference.batches) == 8 and stopped.batches == reference.batches[:6]
    assert sorted(i for _, ids, _ in reference.batches[:6] for i in ids) == list(range(12))
    assert resumed.batches == reference.batches[4:]

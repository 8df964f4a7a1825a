"""Every reader, fed damaged and hostile copies of a valid checkpoint, keeps the bad-input contract.

One small valid seed per reader is written once per session, mostly by shardwise's own
``convert`` from a tiny Llama. Hypothesis then damages one file of a copy: random bytes
(truncation, bit flips, an overwritten range), one value a parser reads (a pickle's int, memo
index or string, a pickle bomb; a JSON or YAML value, deep nesting, an alias bomb; a safetensors
header value) or, in tar archives, a member's content or name (``../x``, an absolute path,
``a//b`` ...), or the member made a symlink or hard link out of the archive. It runs one command on the copy in this process, time- and memory-boxed
(:func:`hostile_inputs.run_boxed`). Whatever the damage, the command must

- exit 0 or 2 (``diff`` also 1), never crash, hang or print a traceback;
- on exit 2 print exactly one line, ``shardwise: error: ...``;
- leave the input's bytes as they were and write nothing outside its output path;
- on success have written its output, on failure have left no partial output.

Examples are derandomized (the same inputs in every run) and bounded per reader, so the whole file
stays within about a minute on a 2-core machine.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from hostile_inputs import HOSTILE_NAMES, LINK_TARGETS, UNCAUGHT, Outcome, damage, mutations, rewrite_member, run_boxed, snapshot, structured_edit, tar_members
from shardwise.cli import run

EXAMPLES_PER_READER = 12  # about 0.1-0.2 s an example: 15 readers and the seeds stay inside the file's one-minute budget
FUZZ = settings(
    max_examples=EXAMPLES_PER_READER, deadline=None, derandomize=True, database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failing reader reports its first example, in bounded time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ALLOWED_CODES = {"inspect": {0, 2}, "convert": {0, 2}, "zero-convert": {0, 2}, "unpack": {0, 2}, "diff": {0, 1, 2}}
WRITERS = ("convert", "zero-convert", "unpack")  # the commands that write into out/
TAR_COMMANDS = ("inspect", "convert", "diff", "unpack")  # unpack writes members to disk: where hostile names matter most
MODEL = dict(hidden=16, intermediate=32, heads=4, kv_heads=2, layers=2, vocab=32)  # TP=2 divides the KV heads


@dataclass(frozen=True)
class Reader:
    """A seed checkpoint for one reader: ``root`` holds it, ``target`` (relative) is what commands get,
    ``files`` (relative) are the files the fuzz may damage; ``to`` the ``convert --to`` format
    (``None``: the reader is a training tag, converted by ``zero-convert --to-full``)."""

    name: str
    root: Path
    target: str
    files: tuple[str, ...]
    to: str | None = "safetensors"
    is_tar: bool = False
    commands: tuple[str, ...] = ("inspect", "convert", "diff")
    digest: dict = field(default_factory=dict, compare=False)  # snapshot() of root: diff reads the seed, which must stay as it is


def _convert(*args) -> None:
    code = run([os.fspath(a) for a in (*args, "-q")])
    assert code == 0, args


def _files(root: Path, under: Path) -> tuple[str, ...]:
    return tuple(sorted(p.relative_to(root).as_posix() for p in under.rglob("*") if p.is_file()))


def _lightning_seed(hf: Path, path: Path) -> None:
    """A ``.ckpt`` shaped as PyTorch Lightning's Trainer saves one: weights under ``state_dict``, Adam
    states, a scheduler, loops and OmegaConf hyper-parameters (pickled globals the allow-list must judge)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    weights = load_file(hf / "model.safetensors")
    params = [torch.nn.Parameter(t.clone()) for t in list(weights.values())[:2]]
    opt = torch.optim.Adam(params, lr=0.01)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    torch.save({
        "epoch": 1, "global_step": 4, "pytorch-lightning_version": "2.4.0", "state_dict": {f"model.{k}": v for k, v in weights.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 2, "completed": 1}}}},
        "callbacks": {}, "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
        "hparams_name": "cfg", "hyper_parameters": {"cfg": OmegaConf.create({"lr": 0.01, "model": {"hidden": MODEL["hidden"]}})},
    }, path)


def _torch_dist_seeds(hf: Path, root: Path) -> None:
    """A NeMo torch_dist nemo-dir (``td``) and a NeMo 2 folder (``nemo2``), written by the suite's
    independent writer (tests/torch_dist_ranks.py) from one in-process gloo rank."""
    import torch_dist_ranks

    root.mkdir()
    for out, flavour in (("td", "nemo1"), ("nemo2", "nemo2")):
        assert torch_dist_ranks.main([str(hf), str(root / out), "1", "whole", "16", flavour]) == 0


def _zero1_tag(tag: Path) -> None:
    """A training checkpoint tag with ZeRO-1 optimizer shards over DP=2 (TP=2), as NxD saves it."""
    from test_zero_convert import full_state, sharded_tag

    sharded_tag(tag, 2, [full_state(0), full_state(1)])


@pytest.fixture(scope="session")
def readers(tmp_path_factory) -> dict[str, Reader]:
    """One valid seed per reader, written once per session."""
    return build_readers(tmp_path_factory.mktemp("seeds"))


def build_readers(root: Path) -> dict[str, Reader]:
    """Write one valid seed per reader under ``root``; the readers by name."""
    hf = tiny_llama(root / "hf", **MODEL)
    found: list[Reader] = []

    def add(name: str, target: str, under: str | None = None, **kw) -> None:
        base = root / name
        files = _files(base, base / (under or "."))
        found.append(Reader(name, base, target, files, digest=snapshot(base), **kw))

    shutil.copytree(hf, root / "hf-folder" / "hf")
    add("hf-folder", "hf", to="hf")
    _convert("convert", hf, root / "safetensors" / "model.safetensors", "--to", "safetensors")
    add("safetensors", "model.safetensors")
    _convert("convert", hf, root / "sharded-index" / "m", "--to", "hf", "--max-shard-size", "4KB")
    add("sharded-index", "m/model.safetensors.index.json", "m")
    _convert("convert", hf, root / "torch-zip" / "model.pt", "--to", "torch")
    add("torch-zip", "model.pt")
    from safetensors.torch import load_file

    (root / "torch-legacy").mkdir()
    torch.save(load_file(hf / "model.safetensors"), root / "torch-legacy" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    add("torch-legacy", "pytorch_model.bin")
    (root / "lightning").mkdir()
    _lightning_seed(hf, root / "lightning" / "last.ckpt")
    add("lightning", "last.ckpt")
    _convert("convert", hf, root / "nemo-tar" / "model.nemo", "--to", "archive", "--tp", "2")
    add("nemo-tar", "model.nemo", to="hf", is_tar=True, commands=TAR_COMMANDS)
    _convert("convert", hf, root / "nemo-gzip" / "model.nemo", "--to", "archive")
    path = root / "nemo-gzip" / "model.nemo"
    path.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    add("nemo-gzip", "model.nemo", to="hf", is_tar=True, commands=TAR_COMMANDS)
    _convert("convert", hf, root / "nemo-dir" / "d", "--to", "nemo-dir", "--tp", "2")
    add("nemo-dir", "d", to="hf")
    _convert("convert", hf, root / "nxdt" / "d", "--to", "nxdt", "--tp", "2", "--pp", "2")
    add("nxdt", "d", to="hf")
    _convert("convert", hf, root / "xser" / "d", "--to", "nxdt", "--tp", "2", "--weights-format", "xser")
    add("xser", "d", to="hf")
    _convert("convert", hf, root / "dcp" / "d", "--to", "dcp")
    add("dcp", "d")
    _torch_dist_seeds(hf, root / "td-seeds")
    (root / "torch-dist").mkdir()
    shutil.move(root / "td-seeds" / "td", root / "torch-dist" / "d")
    add("torch-dist", "d", to="hf")
    (root / "nemo2").mkdir()
    shutil.move(root / "td-seeds" / "nemo2", root / "nemo2" / "d")
    add("nemo2", "d", to="hf")
    _zero1_tag(root / "training-tag" / "tag")
    add("training-tag", "tag", to=None, commands=("inspect", "zero-convert"))
    return {r.name: r for r in found}


READERS = (
    "safetensors", "sharded-index", "hf-folder", "torch-zip", "torch-legacy", "lightning", "nemo-tar", "nemo-gzip",
    "nemo-dir", "nxdt", "xser", "dcp", "torch-dist", "nemo2", "training-tag",
)


def _command(reader: Reader, command: str, target: Path, out: Path) -> list:
    """The argv of ``command`` on ``target`` (compared with the seed), writing (if it writes) into the folder ``out``."""
    dst = out / ("result.safetensors" if reader.to == "safetensors" else "result")
    if command == "inspect":
        return ["inspect", target, "--json"]
    if command == "diff":
        return ["diff", target, reader.root / reader.target, "-q"]
    if command == "zero-convert":
        return ["zero-convert", target, dst, "--to-full"]
    if command == "unpack":
        return ["unpack", target, dst]
    return ["convert", target, dst, "--to", reader.to, "-q"]


def _sandbox(reader: Reader, base: Path) -> Path:
    """A fresh folder: ``in/`` (a copy of the seed, to damage), ``out/`` (the only place a command may write),
    ``victim/`` (a file that hostile names aim at) and ``cwd/`` (the command's working folder)."""
    box = Path(tempfile.mkdtemp(dir=base))
    shutil.copytree(reader.root, box / "in")
    for sub in ("out", "victim", "cwd"):
        (box / sub).mkdir()
    (box / "victim" / "keep.txt").write_text("must stay\n")
    return box


def check_contract(reader: Reader, command: str, argv: list, box: Path) -> Outcome:
    """Run ``argv`` boxed in ``box`` and assert the bad-input contract (see the module docstring)."""
    before = {k: v for k, v in snapshot(box).items() if not k.startswith("out/")}
    outcome = run_boxed(argv, box / "cwd")
    shown = " ".join(map(str, argv))
    assert outcome.killed is None, f"{reader.name}: {shown}: {outcome}"
    assert outcome.code != UNCAUGHT and "Traceback" not in outcome.err, f"{reader.name}: {shown}: traceback: {outcome}"
    assert outcome.code in ALLOWED_CODES[command], f"{reader.name}: {shown}: {outcome}"
    if outcome.code == 2:
        lines = outcome.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("shardwise: error: "), f"{reader.name}: {shown}: not one error line: {outcome}"
    after = snapshot(box)
    outside = {k: v for k, v in after.items() if not k.startswith("out/")}
    assert outside == before, f"{reader.name}: {shown}: changed outside out/: {sorted(set(outside.items()) ^ set(before.items()))[:6]}; {outcome}"
    if command == "diff":
        assert snapshot(reader.root) == reader.digest, f"{reader.name}: {shown}: the seed it compared with changed"
    if command in WRITERS:
        written = [k for k in after if k.startswith("out/")]
        if outcome.code == 0:
            assert written, f"{reader.name}: {shown}: exit 0 but no output"
        else:
            assert not written, f"{reader.name}: {shown}: exit {outcome.code} left {written[:4]}"
    return outcome


@pytest.mark.parametrize("name", READERS)
def test_every_reader_accepts_its_own_seed(readers, name, tmp_path):
    """The seeds are valid: every command succeeds on them (so the fuzz starts from readable inputs)."""
    reader = readers[name]
    for command in reader.commands:
        box = _sandbox(reader, tmp_path)
        outcome = check_contract(reader, command, _command(reader, command, box / "in" / reader.target, box / "out"), box)
        assert outcome.code == 0, f"{name}: {command}: {outcome}"


@pytest.mark.parametrize("name", ["nemo-dir", "nxdt"])
def test_a_refused_rank_file_of_a_container_folder_is_the_message_not_an_empty_folder(readers, name, tmp_path):
    """A container folder whose first rank file is refused is reported as that file's refusal; the
    plain conversion's fallback once said the folder held no weights."""
    import zipfile

    from hostile_inputs import PICKLE_BOMBS

    reader = readers[name]
    box = _sandbox(reader, tmp_path)
    rank_file = box / "in" / min((f for f in reader.files if f.endswith((".ckpt", ".pt")) and "rank_0" in f), key=len)
    with zipfile.ZipFile(rank_file) as z:
        members = {info: z.read(info) for info in z.infolist()}
    with zipfile.ZipFile(rank_file, "w") as z:
        for info, data in members.items():
            z.writestr(info, PICKLE_BOMBS["dag"] if info.filename.endswith("data.pkl") else data)
    outcome = check_contract(reader, "convert", _command(reader, "convert", box / "in" / reader.target, box / "out"), box)
    assert outcome.code == 2 and rank_file.name in outcome.err and "holds no weights" not in outcome.err, outcome


def _hostile_copy(reader: Reader, box: Path, data: st.DataObject) -> str:
    """Damage one file of the sandbox's seed copy (drawn from ``data``): random bytes, one value its
    parser reads, or (tar archives) one member's name or content; returns what was done, as a reproducer note."""
    rel = data.draw(st.sampled_from(reader.files), label="file")
    path = box / "in" / rel
    original = path.read_bytes()
    modes = ["bytes", "structure"] + (["rename", "member", "link"] if reader.is_tar else [])
    mode = data.draw(st.sampled_from(modes), label="mode")
    if mode == "bytes":
        edits = data.draw(mutations(len(original)), label="edits")
        path.write_bytes(damage(original, edits))
        return f"{rel}: damage(seed, {edits!r})"
    if mode == "structure":
        changed, what = structured_edit(path.name, original, data.draw)
        path.write_bytes(changed)
        return f"{rel}: {what}"
    members = tar_members(original)
    index = data.draw(st.integers(0, len(members) - 1), label="member")
    if mode == "rename":
        hostile = data.draw(st.sampled_from(HOSTILE_NAMES), label="hostile name").format(root=box, name="pwned")
        path.write_bytes(rewrite_member(original, index, name=hostile))
        return f"{rel}: member {members[index][0]!r} renamed to {hostile!r}"
    if mode == "link":
        kind = data.draw(st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE]), label="link type")
        target = data.draw(st.sampled_from(LINK_TARGETS), label="link target").format(root=box)
        path.write_bytes(rewrite_member(original, index, link=(kind, target)))
        return f"{rel}: member {members[index][0]!r} made a {'symlink' if kind == tarfile.SYMTYPE else 'hard link'} to {target!r}"
    done = []

    def edit(body: bytes) -> bytes:
        changed, what = structured_edit(Path(members[index][0]).name, body, data.draw)
        done.append(what)
        return changed

    path.write_bytes(rewrite_member(original, index, edit=edit))
    return f"{rel}: member {members[index][0]!r}: {done[0] if done else 'not a file'}"


@pytest.mark.parametrize("name", READERS)
@FUZZ
@given(data=st.data())
def test_damaged_and_hostile_inputs_keep_the_bad_input_contract(readers, name, tmp_path, data):
    """Truncated, bit-flipped, overwritten or (tar) hostile-named copies: exit 0/2 (diff also 1), one
    error line, no traceback, no hang, the input untouched and nothing written outside the output."""
    reader = readers[name]
    box = _sandbox(reader, tmp_path)
    try:
        what = _hostile_copy(reader, box, data)
        command = data.draw(st.sampled_from(reader.commands), label="command")
        note(f"{name}: {what}; {command}")
        check_contract(reader, command, _command(reader, command, box / "in" / reader.target, box / "out"), box)
    finally:
        shutil.rmtree(box, ignore_errors=True)

"""The wire contract: every message kind round-trips, and what does not fit is refused clearly."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

import torchrunx
from torchrunx.transport import messages
from torchrunx.transport.messages import (
    PROTOCOL_VERSION,
    Died,
    Hello,
    HostFacts,
    Message,
    Output,
    Run,
    RunSpec,
    VersionMismatchError,
    WireError,
    WorkerSlot,
    decode,
    encode,
    parse,
)

SPEC = RunSpec(
    run="r1",
    world_size=3,
    backend=None,
    master_addr="10.0.0.1",
    env={"A": "1 2", "B": "ü"},
    cwd="/w",
    sys_path=("/w", ""),
    worker_timeout=600.0,
    result_token="t" * 32,
    log_level=20,
    server_key=None,
    group_rank=1,
    hostname="node2",
    address="10.0.0.2",
    local_world_size=2,
    workers=(WorkerSlot(1, 0), WorkerSlot(2, 1)),
    debug=messages.DebugSettings(terminal=True, ranks=(0, 2), post_mortem=True),
    preempt_signals=("SIGUSR2",),
)
FACTS = HostFacts(pid=1, hostname="node1", gpus=0, cpus=2, python="/py", dir="/tmp/x")

# one example of every kind, with every field set to something other than its default
EXAMPLES: list[Message] = [
    messages.Boot(
        PROTOCOL_VERSION,
        "tcp://1.2.3.4:5",
        "ab",
        "s",
        "node1",
        60.0,
        "/e",
        "k",
        ("json",),
        learn=False,
        preempt_signals=("SIGTERM", "SIGUSR1"),
    ),
    Hello(PROTOCOL_VERSION, "s", FACTS),
    messages.Heartbeat(),
    messages.Signalled("SIGUSR1"),
    messages.Notice(),
    Run(SPEC),
    messages.Credit(4096),
    messages.Go("r1"),
    messages.Cancel("r1"),
    messages.Rendezvous("r1", 29500),
    messages.Cleared("r1"),
    Output("r1", 2, 1, "stdout", "INFO"),
    Died("r1", 2, 1, 77, ("a", "b"), exitcode=None, signal="SIGKILL"),
    messages.Dump("r1", "q1", what="status"),
    messages.Stacks("r1", "q1", (messages.RankStack(2, 1, "Thread 0x1 ..."),), (3,)),
    messages.Up(12),
    messages.Fork(SPEC, "ipc:///tmp/x/workers", "tcp://1.2.3.4:5", (10, 0, 7), learn=True),
    messages.Preload(("json", "xml.dom"), strict=False, env={"A": "1"}, cwd="/w", sys_path=("",)),
    messages.Preloaded(("json",), ("nosuch",), unsafe="xml.dom", why="it starts 1 thread(s)"),
    messages.Imported("r1", ("json", "json.decoder")),
    messages.Status(
        "r1",
        "q2",
        (messages.RankStatus(2, "node2", 1, 77, "running", 1.5, 1 << 20, 99.5, 0, 0.25, "hi"),),
    ),
    messages.Phases("r1", (messages.Phase(2, "function", 1.0, 2.5),)),
    messages.Forked("r1", 1, 78),
    messages.Exited(78, 9),
    messages.Connect(),
    messages.Port("r1", 40000),
    messages.Result("r1", 2, 1, direct=True),
    messages.DirectResult("r1", 2, "t" * 32),
    messages.Raised("r1", 2, 1, "builtins.ValueError", "bad", "tb", unpicklable="why"),
    messages.Unpicklable("r1", 2, 1, "lock", "builtins.TypeError", "cannot", "tb"),
    messages.Ack(),
    messages.Debug("r1", 2, 1, "(Pdb) ", "prompt", why="breakpoint() at train.py:9"),
    messages.DebugInput("r1", 1, None, why="Ctrl-C at the prompt"),
    messages.SyncOffer(
        messages.PROTOCOL_VERSION,
        "project-0123456789ab",
        (messages.SyncFile("train.py", "ab" * 32, 120, executable=False),),
    ),
    messages.SyncWant(("ab" * 32,)),
    messages.SyncDone("/home/me/.cache/torchrunx/copies/project-0123456789ab", 120, 1),
]


def test_every_kind_has_an_example() -> None:
    kinds = {cls.KIND for cls in Message.__subclasses__()}
    assert kinds == {m.KIND for m in EXAMPLES}


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.KIND)
def test_every_kind_round_trips_with_its_buffers(message: Message) -> None:
    frames = encode(message, b"payload", memoryview(b"more"))
    assert frames[0] == message.KIND.encode()
    decoded, buffers = decode([bytes(f) for f in frames])
    assert decoded == message
    assert type(decoded) is type(message)
    assert buffers == [b"payload", b"more"]


def header_of(message: Message) -> dict[str, object]:
    return json.loads(bytes(encode(message)[1]))


def test_a_renamed_or_missing_field_is_refused_not_read_as_none() -> None:
    header = header_of(Died("r1", 2, 1, 77, ()))
    header["rnak"] = header.pop("rank")
    with pytest.raises(WireError, match=r"Died: unknown fields \['rnak'\]"):
        decode([b"died", json.dumps(header).encode()])
    del header["rnak"]
    with pytest.raises(WireError, match="rank"):
        decode([b"died", json.dumps(header).encode()])


@pytest.mark.parametrize(
    ("field", "value"),
    [("rank", "2"), ("rank", True), ("rank", 2.5), ("tail", "a"), ("run", None), ("pid", None)],
)
def test_a_field_of_the_wrong_type_is_refused(field: str, value: object) -> None:
    header = header_of(Died("r1", 2, 1, 77, ()))
    header[field] = value
    with pytest.raises(WireError, match=field):
        decode([b"died", json.dumps(header).encode()])


def test_nested_values_are_checked_too() -> None:
    header = header_of(Run(SPEC))
    header["spec"]["workers"][1]["local_rank"] = "1"  # type: ignore[index]
    with pytest.raises(WireError, match="local_rank"):
        decode([b"run", json.dumps(header).encode()])
    header = header_of(Run(SPEC))
    header["spec"]["env"]["A"] = 1  # type: ignore[index]
    with pytest.raises(WireError, match="env"):
        decode([b"run", json.dumps(header).encode()])


@pytest.mark.parametrize(
    ("message", "field", "value"),
    [
        (Output("r1", 2, 1, "stdout", "INFO"), "stream", "stdin"),
        (Output("r1", 2, 1, "stdout", "INFO"), "level", "LOUD"),
        (messages.Dump("r1", "q1"), "what", "heap"),
        (messages.Debug("r1", 2, 1, "", "prompt"), "state", 1),
        (EXAMPLES[[m.KIND for m in EXAMPLES].index("status")], "ranks", [{"state": "asleep"}]),
    ],
)
def test_a_word_outside_its_list_is_refused(message: Message, field: str, value: object) -> None:
    header = header_of(message)
    if field == "ranks":  # inside a nested value: the rest of that rank as it was
        value = [{**header["ranks"][0], **value[0]}]  # type: ignore[index, dict-item]
    header[field] = value
    with pytest.raises(WireError, match=r"stream|level|what|state"):
        decode([message.KIND.encode(), json.dumps(header).encode()])


def test_stacks_say_whether_they_were_asked_for() -> None:
    autopsy = messages.Stacks("r1", None, (), ())
    assert decode(encode(autopsy))[0] == autopsy
    assert header_of(autopsy)["request"] is None


def test_worker_identities_round_trip_and_strangers_are_refused() -> None:
    identity = messages.worker_identity("ab:cd", 3)
    assert messages.parse_worker_identity(identity) == ("ab:cd", 3)
    for stranger in (b"", b"r1", b"r1:", b":3", b"r1:x"):
        with pytest.raises(WireError, match="identity"):
            messages.parse_worker_identity(stranger)


def test_json_lines_are_one_line_that_parse_reads_back() -> None:
    line = messages.json_line(messages.SyncWant(("ab" * 32, "new\nline")))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert parse(messages.SyncWant, line) == messages.SyncWant(("ab" * 32, "new\nline"))


@pytest.mark.parametrize(
    "frames",
    [
        [b"nosuchkind", b"{}"],
        [b"died"],
        [b"died", b"not json"],
        [b"died", b"[1, 2]"],
        [b"\xff", b"{}"],
    ],
)
def test_malformed_messages_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        decode(frames)


def test_another_protocol_version_names_both() -> None:
    hello = dataclasses.replace(Hello(PROTOCOL_VERSION, "s", FACTS), version=PROTOCOL_VERSION + 1)
    with pytest.raises(VersionMismatchError) as info:
        decode(encode(hello))
    assert f"version {PROTOCOL_VERSION + 1}" in str(info.value)
    assert f"speaks {PROTOCOL_VERSION}" in str(info.value)
    # the version is checked before anything else: another release's fields do not matter
    with pytest.raises(VersionMismatchError):
        parse(messages.Boot, json.dumps({"version": 1, "field_of_release_1": 0}).encode())


def test_an_agent_of_another_version_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # the launcher believes it speaks another version than the (real) agent it starts; the
    # boot it sends is made by the pool, imported first so that it keeps the real version
    import torchrunx.pool

    monkeypatch.setattr(messages, "PROTOCOL_VERSION", PROTOCOL_VERSION + 7)
    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None)
    with pytest.raises(torchrunx.AgentFailedError) as info:
        launcher.run(os.getpid)
    launcher.close()
    assert f"version {PROTOCOL_VERSION}" in str(info.value)
    assert f"speaks {PROTOCOL_VERSION + 7}" in str(info.value)
    assert "localhost" in str(info.value)


def test_a_launcher_of_another_version_is_refused_by_the_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchrunx import pool

    monkeypatch.setattr(pool, "PROTOCOL_VERSION", PROTOCOL_VERSION + 7)  # what boot carries
    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None)
    with pytest.raises(torchrunx.AgentFailedError) as info:
        launcher.run(os.getpid)
    launcher.close()
    assert f"version {PROTOCOL_VERSION + 7}" in str(info.value)
    assert f"speaks {PROTOCOL_VERSION}" in str(info.value)


def test_the_architecture_page_names_every_kind_and_module() -> None:
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "how-it-works.md"
    section = page.read_text()
    for cls in Message.__subclasses__():
        assert f"| `{cls.KIND}` |" in section, f"{cls.KIND} is not in how-it-works.md's table"
    package = Path(torchrunx.__file__).parent
    for module in package.rglob("*.py"):
        name = module.relative_to(package).as_posix()
        if module.name in ("__init__.py", "__main__.py") or name.startswith("utils/"):
            continue
        short = name.rsplit("/", 1)[-1] if name.startswith("transport/") else name
        top = name.split("/", 1)[0] + "/"
        assert f"`{name}`" in section or f"`{short}`" in section or f"`{top}`" in section, name

"""Runs that succeed: values, ranks, environment, process groups, function kinds, many runs."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist

import torchrunx

if TYPE_CHECKING:
    from pathlib import Path


def env_and_group() -> dict[str, object]:
    keys = [
        "RANK",
        "LOCAL_RANK",
        "GROUP_RANK",
        "LOCAL_WORLD_SIZE",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ]
    t = torch.tensor([float(os.environ["RANK"]) + 1])
    dist.all_reduce(t)
    return {
        **{k: os.environ[k] for k in keys},
        "backend": dist.get_backend(),
        "world": dist.get_world_size(),
        "sum": t.item(),
        "pid": os.getpid(),
    }


def test_workers_get_rank_variables_and_a_ready_group(launcher: torchrunx.Launcher) -> None:
    result = launcher.run(env_and_group)
    values = result.by_rank()
    assert [v["RANK"] for v in values] == ["0", "1"]
    assert [v["LOCAL_RANK"] for v in values] == ["0", "1"]
    for v in values:
        assert v["GROUP_RANK"] == "0"
        assert v["LOCAL_WORLD_SIZE"] == "2"
        assert v["WORLD_SIZE"] == "2"
        assert v["backend"] == "gloo"
        assert v["world"] == 2
        assert v["sum"] == 3.0
        assert int(v["MASTER_PORT"]) > 0
    assert values[0]["MASTER_PORT"] == values[1]["MASTER_PORT"]
    assert values[0]["pid"] != values[1]["pid"]


def test_every_run_gets_fresh_worker_processes(launcher: torchrunx.Launcher) -> None:
    pids = [set(launcher.run(os.getpid).by_rank()) for _ in range(3)]
    assert len(pids[0] | pids[1] | pids[2]) == 6


def test_launch_result_accessors(launcher: torchrunx.Launcher) -> None:
    result = launcher.run(lambda: int(os.environ["RANK"]) * 10)
    assert result.rank(0) == 0
    assert result.rank(1) == 10
    assert result.rank(-1) == 10
    assert result.index("localhost", 1) == 10
    assert result.index(hostname="localhost", local_rank=0) == 0
    assert result.by_hostname() == {"localhost": [0, 10]}
    assert result.results == {"localhost": [0, 10]}
    assert result.by_rank() == [0, 10]
    assert len(result) == 2
    assert list(result) == [0, 10]
    with pytest.raises(IndexError, match="rank 2"):
        result.rank(2)
    with pytest.raises(KeyError, match="node9"):
        result.index("node9", 0)


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


class Multiplier:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, x: int) -> int:
        return self.k * x


def test_function_kinds(launcher: torchrunx.Launcher) -> None:
    offset = 7

    def closure(x: int) -> int:
        return x + offset

    assert launcher.run(add, 1, 2, scale=3).rank(0) == 9
    assert launcher.run(lambda x: x * 2, 21).rank(1) == 42
    assert launcher.run(closure, 1).rank(0) == 8
    assert launcher.run(functools.partial(add, 5), b=6).rank(0) == 11
    assert launcher.run(Multiplier(3), 4).rank(1) == 12


def no_positional(*, greeting: str = "hi") -> str:
    return greeting


def test_legacy_kwargs_dict(launcher: torchrunx.Launcher) -> None:
    assert launcher.run(no_positional, {}).rank(0) == "hi"
    assert launcher.run(no_positional, {"greeting": "yo"}).rank(0) == "yo"
    # a function that takes a dict positionally gets the dict
    result = launcher.run(lambda d: sorted(d), {"a": 1})  # noqa: PLW0108 -- a lambda on purpose
    assert result.rank(0) == ["a"]


def test_arguments_and_results_carry_tensors(launcher: torchrunx.Launcher) -> None:
    big = torch.arange(1_000_000, dtype=torch.float64)

    def work(x: torch.Tensor) -> dict[str, torch.Tensor]:
        r = int(os.environ["RANK"])
        base = torch.full((4, 4), float(r), dtype=torch.bfloat16)
        return {
            "sum": x.sum(),
            "base": base,
            "view": base[1:, ::2],
            "grad": torch.ones(3, requires_grad=True),
        }

    result = launcher.run(work, big)
    for r in (0, 1):
        v = result.rank(r)
        assert v["sum"].item() == big.sum().item()
        assert v["base"].dtype == torch.bfloat16
        assert torch.equal(v["base"], torch.full((4, 4), float(r), dtype=torch.bfloat16))
        assert torch.equal(v["view"], v["base"][1:, ::2])
        assert v["view"].untyped_storage().data_ptr() == v["base"].untyped_storage().data_ptr()
        assert v["grad"].requires_grad


def test_large_results_arrive_intact(launcher: torchrunx.Launcher) -> None:
    """Results of 1 MiB and more take the direct path to the launcher; small ones do not."""

    def work() -> dict[str, torch.Tensor]:
        r = int(os.environ["RANK"])
        return {"big": torch.arange(3_000_000, dtype=torch.int64) * (r + 1), "small": torch.ones(2)}

    result = launcher.run(work)
    for r in (0, 1):
        expected = torch.arange(3_000_000, dtype=torch.int64) * (r + 1)
        assert torch.equal(result.rank(r)["big"], expected)
        assert torch.equal(result.rank(r)["small"], torch.ones(2))


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def _forge_result(address: str, marker: str) -> str:
    """Rank 1 sends the launcher a result for rank 0 with a wrong token, then returns its own."""
    import zmq

    from torchrunx.transport import serialization
    from torchrunx.transport.messages import DirectResult, encode

    if os.environ["RANK"] == "1":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        forged = DirectResult(run=os.environ["TORCHRUNX_RUN_ID"], rank=0, token="0" * 32)
        sock.connect(address)
        sock.send_multipart(encode(forged, *serialization.dumps(_CreatesFile(marker))))
        answered = sock.poll(500)
        ctx.destroy(linger=0)
        assert not answered, "a result with a wrong token was acknowledged"
    return f"rank {os.environ['RANK']}"


def test_a_result_without_the_run_token_is_refused_unread(
    launcher: torchrunx.Launcher, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    assert launcher._pool is not None
    address = launcher._pool.controller.address
    result = launcher.run(_forge_result, address, str(marker))
    assert result.by_rank() == ["rank 0", "rank 1"]
    assert not marker.exists()


def test_backend_none_has_no_group_but_has_master_vars() -> None:
    def check() -> tuple[bool, str, str]:
        return dist.is_initialized(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]

    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend=None) as lau:
        values = lau.run(check).by_rank()
    assert [v[0] for v in values] == [False, False]
    assert values[0][2] == values[1][2]


def test_defaults_on_a_machine_without_gpus() -> None:
    with torchrunx.Launcher() as lau:
        result = lau.run(lambda: (dist.get_backend(), dist.get_world_size()))
    assert result.by_hostname() == {"localhost": [("gloo", 1)]}


def test_launch_one_call_form() -> None:
    result = torchrunx.launch(
        add, (1, 2), {"scale": 2}, hostnames=["localhost"], workers_per_host=2, backend="gloo"
    )
    assert result.by_rank() == [6, 6]


def test_sweep_of_many_runs_on_one_launcher(launcher: torchrunx.Launcher) -> None:
    for i in range(30):
        assert launcher.run(lambda i=i: i + int(os.environ["RANK"])).by_rank() == [i, i + 1]


def test_two_launchers_coexist() -> None:
    with (
        torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo") as train,
        torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend="gloo") as ev,
    ):
        for _ in range(2):
            assert train.run(dist.get_world_size).by_rank() == [2, 2]
            assert ev.run(dist.get_world_size).by_rank() == [1]


def test_launcher_never_joins_a_process_group(launcher: torchrunx.Launcher) -> None:
    launcher.run(dist.barrier)
    assert not dist.is_initialized()


def test_env_vars_copy_and_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRX_COPIED_A", "a b 'c' $d")
    monkeypatch.setenv("TRX_NOT_COPIED", "x")
    with torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=1,
        backend=None,
        copy_env_vars=(*torchrunx.DEFAULT_ENV_VARS_FOR_COPY, "TRX_COPIED_*"),
        extra_env_vars={"TRX_EXTRA": "é\nline2"},
    ) as lau:
        env = lau.run(lambda: dict(os.environ)).rank(0)
        monkeypatch.setenv("TRX_COPIED_A", "changed")
        later = lau.run(lambda: os.environ["TRX_COPIED_A"]).rank(0)
    assert env["TRX_COPIED_A"] == "a b 'c' $d"
    assert env["TRX_EXTRA"] == "é\nline2"
    assert "TRX_NOT_COPIED" not in env
    assert later == "changed"  # copied afresh at every run


def test_env_file_is_sourced_and_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "env.sh"
    env_file.write_text('export TRX_FROM_FILE="host-$(hostname)"\nTRX_EXTRA=from-file\n')
    with torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=1,
        backend=None,
        env_file=env_file,
        extra_env_vars={"TRX_EXTRA": "from-extra"},
    ) as lau:
        env = lau.run(lambda: dict(os.environ)).rank(0)
    assert env["TRX_FROM_FILE"].startswith("host-")
    assert env["TRX_EXTRA"] == "from-file"


def test_bad_env_file_names_file_and_shell_message(tmp_path: Path) -> None:
    env_file = tmp_path / "broken.sh"
    env_file.write_text("this_command_does_not_exist_42\n")
    lau = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, env_file=env_file)
    with pytest.raises(torchrunx.AgentFailedError) as info:
        lau.run(os.getpid)
    assert "broken.sh" in str(info.value)
    assert "this_command_does_not_exist_42" in str(info.value)
    lau.close()


def test_function_from_main_and_from_a_module_in_the_launchers_directory(tmp_path: Path) -> None:
    (tmp_path / "mymodule.py").write_text("def triple(x):\n    return 3 * x\n")
    (tmp_path / "script.py").write_text(
        textwrap.dedent("""
        import torchrunx
        from mymodule import triple

        def in_main(x):
            return triple(x) + 1

        if __name__ == "__main__":
            with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2,
                                    backend="gloo") as launcher:
                print(launcher.run(triple, 2).by_rank(), launcher.run(in_main, 2).by_rank())
    """)
    )
    out = subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TORCHRUNX_LOG_DIR": ""},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[6, 6] [7, 7]")


NOTEBOOK_CELLS = [
    (
        "import torchrunx\n"
        "launcher = torchrunx.Launcher(hostnames=['localhost'], workers_per_host=2, backend='gloo')"
    ),
    "import os\nscale = 10\n\ndef cell_fn(x):\n    return x * scale + int(os.environ['RANK'])",
    "class Point:\n    def __init__(self, x):\n        self.x = x",
    (
        "values = launcher.run(cell_fn, 2).by_rank()\n"
        "points = launcher.run(lambda: Point(cell_fn(1))).by_rank()\n"
        "print('RESULT', values, [p.x for p in points])\nlauncher.close()"
    ),
]


def test_functions_and_classes_defined_in_notebook_cells() -> None:
    """Cells run by IPython's own shell, as in Jupyter: code lives in __main__'s namespace."""
    program = textwrap.dedent(f"""
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        for cell in {NOTEBOOK_CELLS!r}:
            shell.run_cell(cell).raise_error()
    """)
    out = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TORCHRUNX_LOG_DIR": ""},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RESULT [20, 21] [10, 11]" in out.stdout, out.stdout + out.stderr

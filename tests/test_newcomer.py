"""The rough edges a newcomer hits first: the quickstart's files, the README's Python snippet, the
help of `spaces join`, and what `make run` prints while it sets itself up."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import grpc

from spaces.cli import build_parser
from spaces.server import SpacesServer
from spaces.v1 import presence_pb2, presence_pb2_grpc
from tests.support.system import ADMIN_KEY

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_the_quickstart_files_are_git_ignored() -> None:
    result = subprocess.run(
        ["git", "check-ignore", "key.json", "space.json", "alice.jwt", "bob.jwt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["key.json", "space.json", "alice.jwt", "bob.jwt"]


def readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(
        rf"<!-- {name}:begin -->\s*```\w+\n(.*?)```\s*<!-- {name}:end -->", text, re.S
    )
    assert match, f"README.md lost its {name} block"
    return match.group(1)


async def run(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_readme_sign_token_snippet_works_as_written(
    server: SpacesServer, tmp_path: Path
) -> None:
    # key.json and space.json exactly as the quickstart writes them (grpcurl's output).
    auth = f"authorization: Bearer {ADMIN_KEY}"
    grpcurl = str(BIN / "grpcurl")
    code, key_json, err = await run(
        grpcurl, "-plaintext", "-H", auth, server.address,
        "spaces.v1.SigningKeyService/CreateSigningKey", cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    (tmp_path / "key.json").write_text(key_json)
    code, space_json, err = await run(
        grpcurl, "-plaintext", "-H", auth, "-d", '{"passthrough": "snippet"}', server.address,
        "spaces.v1.SpaceService/CreateSpace", cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    (tmp_path / "space.json").write_text(space_json)

    snippet = readme_block("sign-token")
    (tmp_path / "snippet.py").write_text(snippet)
    code, out, err = await run(str(BIN / "python"), "snippet.py", cwd=tmp_path)
    assert code == 0, err
    token = out.strip()
    assert token.count(".") == 2
    # The token it printed joins the space as alice.
    async with grpc.aio.insecure_channel(server.address) as channel:
        joined = await presence_pb2_grpc.PresenceServiceStub(channel).Join(
            presence_pb2.JoinRequest(token=token)
        )
    assert joined.participant_id == "alice"
    assert joined.role == 1  # ROLE_PUBLISHER


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[name]  # type: ignore[no-any-return]


def test_spaces_join_help_says_what_it_does_and_shows_its_defaults() -> None:
    result = subprocess.run(
        [str(BIN / "spaces"), "join", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())
    # It publishes only when asked to.
    assert "Publishes nothing unless --test-pattern or --file is given" in text
    overview = " ".join(
        subprocess.run(
            [str(BIN / "spaces"), "--help"], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "(publish with --test-pattern or --file)" in overview
    # Every option with a real default shows it, with the value the parser uses.
    shown = 0
    for action in subcommand("join")._actions:
        if action.default in (None, False, "", argparse.SUPPRESS):
            continue
        assert f"(default: {action.default})" in text, action.dest
        shown += 1
    assert shown >= 2  # --server and --duration at least


def test_spaces_join_without_media_flags_publishes_nothing() -> None:
    args = subcommand("join").parse_args(["--token", "t"])
    assert not args.test_pattern and args.file is None


def test_the_project_metadata_raises_no_setuptools_warnings() -> None:
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    finally:
        os.chdir(cwd)
    assert dist.get_name() == "spaces"


def test_make_install_prints_a_progress_summary_and_keeps_pip_output_in_a_log(
    tmp_path: Path,
) -> None:
    """The first `make run` sets up .venv. Its terminal output is a few lines of progress; pip's
    (here a stand-in python that prints pip-like noise) goes to .venv/install.log."""
    fake = tmp_path / "python3"
    fake.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            if [ "$1 $2" = "-m venv" ]; then
                mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
            fi
            i=0
            while [ $i -lt 200 ]; do echo "Collecting noise-$i"; i=$((i+1)); done
            echo "SetuptoolsDeprecationWarning: project.license as a TOML table" >&2
            exit 0
            """
        )
    )
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install", f"PYTHON={fake}", f"VENV={venv}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert 2 <= len(lines) <= 6, lines
    assert lines[0].startswith("==> setting up") and "ready in" in lines[-1]
    assert not any("noise" in line or "Deprecation" in line for line in lines)
    log = (venv / "install.log").read_text()
    assert "Collecting noise-199" in log and "SetuptoolsDeprecationWarning" in log
    assert (venv / ".installed").exists()


def test_a_failing_install_shows_the_end_of_the_log_and_fails(tmp_path: Path) -> None:
    fake = tmp_path / "python3"
    fake.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            if [ "$1 $2" = "-m venv" ]; then
                mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
            fi
            echo "ERROR: No matching distribution found for grpcio"
            exit 1
            """
        )
    )
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install", f"PYTHON={fake}", f"VENV={venv}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode != 0
    assert "No matching distribution found for grpcio" in result.stdout + result.stderr
    assert not (venv / ".installed").exists()

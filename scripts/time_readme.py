"""Time the README's set-up and "Compress your own model" commands, so its time claims are measured.

Each command runs as a whole process, as a user runs it, in a scratch directory, one after another
(never two at once on a 2-core machine); wall time is the best of `--repeat` runs.

    python scripts/time_readme.py                  # quickstart, make_example, your-model compress (~2 min)
    python scripts/time_readme.py --smoke          # two instant commands (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_command(startswith: str) -> list[str]:
    """The first README line `$ <startswith> ...`, as argv."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f"$ {startswith}"):
            return shlex.split(line[2:])
    raise SystemExit(f"no README line starts with '$ {startswith}'")


def commands(smoke: bool) -> list[tuple[str, list[str]]]:
    if smoke:
        return [("version", ["vitcompress", "--version"]), ("recipe list", ["vitcompress", "recipe", "list"])]
    return [
        (
            "quickstart (set-up command's main job)",
            ["vitcompress", "compress", "--recipe", "quickstart", "--out", "out/"],
        ),
        ("make_example.py", readme_command("python scripts/make_example.py")),
        (
            "your-model compress (prune-kd-int8)",
            readme_command("vitcompress compress --recipe prune-kd-int8"),
        ),
    ]


def run(argv: list[str], cwd: Path) -> float:
    if argv[0] == "vitcompress":
        argv = [str(Path(sys.executable).parent / "vitcompress"), *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows = []
    for name, argv in commands(args.smoke):
        times = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as scratch:
                cwd = Path(scratch)
                if name.startswith("your-model"):  # needs the example files made first
                    run(readme_command("python scripts/make_example.py"), cwd)
                times.append(run(argv, cwd))
        rows.append({"command": name, "best_s": round(min(times), 1), "runs": len(times)})
    print("| command | wall (best) |\n|---|---|")
    for row in rows:
        print(f"| {row['command']} | {row['best_s']} s |")
    if args.json:
        args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Build and test emafuse against every supported torch release, and write the results.

For each release M with a requirements/torch-M.txt (or the ones named), in turn: `./dev.sh suite M`
(make .venvs/torch-M, install that torch and the test dependencies, build emafuse against it,
run the Python test suite), then benchmarks/bench_torch_release.py in that environment. Writes
the compatibility table (torch × builds × tests) into README.md and the AdamW timings of all
releases measured so far into benchmarks/RESULTS.md (section TORCH:RELEASES); each release's log
and timings go to target/torch-matrix/ (torch-M.log, bench-M.json).

    python tools/torch_matrix.py            # every supported release (25 to 35 min each here)
    python tools/torch_matrix.py 2.12 2.13  # some; the table keeps the other releases' rows
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "target" / "torch-matrix"
README_BEGIN, README_END = "<!-- TORCH-MATRIX:BEGIN -->", "<!-- TORCH-MATRIX:END -->"
ROW = re.compile(r"^\| (\d+\.\d+\.\d+\S*) \|")


def minor_key(version: str) -> tuple[int, int]:
    """``(major, minor)`` of "2.13" or "2.13.0": the release a README row belongs to."""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def releases() -> list[str]:
    return sorted((p.stem.removeprefix("torch-") for p in (ROOT / "requirements").glob("torch-*.txt")), key=minor_key)


def pinned_torch(release: str) -> str:
    text = (ROOT / "requirements" / f"torch-{release}.txt").read_text()
    return re.search(r"^torch==(\S+)$", text, re.M).group(1)


def venv_python(release: str) -> str:
    return str(ROOT / ".venvs" / f"torch-{release}" / "bin" / "python")


def run_release(release: str) -> str:
    """Build, test and benchmark against one release; its README row."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"torch-{release}.log"
    start = time.monotonic()
    with log.open("w") as out:
        suite = subprocess.run(["./dev.sh", "suite", release], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    minutes = (time.monotonic() - start) / 60
    text = log.read_text()
    # pytest runs only after setup built and installed emafuse.
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?)\b.*?) in [\d.]+s", text, re.M)
    tests = summary[-1] if summary else "not run"
    bench_file = LOGS / f"bench-{release}.json"
    bench_file.unlink(missing_ok=True)
    if suite.returncode == 0:
        bench = subprocess.run([venv_python(release), "benchmarks/bench_torch_release.py"], cwd=ROOT, capture_output=True, text=True)
        if bench.returncode == 0:
            bench_file.write_text(bench.stdout.strip().splitlines()[-1] + "\n")
    status = "yes" if summary else "**no**"
    verdict = "passes" if suite.returncode == 0 else "**fails**"
    row = f"| {pinned_torch(release)} | {status} | {verdict}: {tests} | {minutes:.0f} min | {datetime.date.today()} |"
    print(row, flush=True)
    return row


def write_readme(rows: dict[str, str]) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    old = text[text.index(README_BEGIN) : text.index(README_END)]
    for line in old.splitlines():
        match = ROW.match(line)
        if match:
            rows.setdefault(".".join(map(str, minor_key(match.group(1)))), line)
    table = [
        "| torch | builds | test suite (`./dev.sh suite M`) | setup + build + tests | date |",
        "| --- | --- | --- | --- | --- |",
        *(rows[m] for m in sorted(rows, key=minor_key)),
    ]
    new = README_BEGIN + "\n" + "\n".join(table) + "\n"
    readme.write_text(text.replace(old, new))


def main(argv: list[str]) -> int:
    wanted = argv or releases()
    unknown = sorted(set(wanted) - set(releases()))
    if unknown:
        print(f"not supported: {', '.join(unknown)} (supported: {', '.join(releases())})", file=sys.stderr)
        return 2
    rows = {}
    for release in wanted:
        rows[release] = run_release(release)
        write_readme(dict(rows))
    # The timings of every release measured so far (this run's and earlier runs'), in one table.
    lines = [(LOGS / f"bench-{r}.json").read_text() for r in releases() if (LOGS / f"bench-{r}.json").exists()]
    if lines:
        (LOGS / "bench.jsonl").write_text("".join(lines))
        table = [venv_python(wanted[-1]), "benchmarks/bench_torch_release.py", "--table", str(LOGS / "bench.jsonl")]
        subprocess.run(table, cwd=ROOT, check=True)
    return 0 if all("passes" in row for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

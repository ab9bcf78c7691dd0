"""Run a Python script under a sampling profiler: what the worker's Python spends its CPU on.

    python -m bench.pipeline_profile OUT.txt worker.py --state-dir DIR
    python -m bench.pipeline_profile OUT.txt -m firebreak.broker --port 8080 ...

A thread samples every other thread's stack every few milliseconds (a thread waiting in select, a lock
or a queue counts as idle) and rewrites OUT.txt every 5 s with the functions seen most, inclusive.
``bench/pipeline.py --profile worker=OUT.txt`` (or ``broker=``) starts that process this way.
"""

from __future__ import annotations

import collections
import runpy
import sys
import threading
import time
from pathlib import Path

IDLE = ("selectors.py:select", "threading.py:wait", "queue.py:get", "threading.py:_wait_for_tstate_lock",
        "pipeline_profile.py:_sample", "futures/thread.py:_worker")


def _sample(out: Path, interval: float = 0.002) -> None:
    me = threading.get_ident()
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    imports: collections.Counter[str] = collections.Counter()  # what the samples were importing
    busy = idle = 0
    last = time.monotonic()
    while True:
        time.sleep(interval)
        for tid, frame in sys._current_frames().items():
            if tid == me:
                continue
            names = []
            f = frame
            importing = None
            while f is not None:
                names.append(f"{'/'.join(Path(f.f_code.co_filename).parts[-2:])}:{f.f_code.co_name}")
                if f.f_code.co_name == "_find_and_load":
                    importing = str(f.f_locals.get("name"))
                f = f.f_back
            if importing is not None:
                imports[importing] += 1
            if any(names[0].endswith(i) for i in IDLE) or not names:
                idle += 1
                continue
            busy += 1
            leaf[names[0]] += 1
            for name in set(names):
                inclusive[name] += 1
        if time.monotonic() - last > 5:
            last = time.monotonic()
            lines = [f"busy samples {busy}, idle {idle}", "", "inclusive:"]
            lines += [f"{n / max(1, busy):6.1%}  {name}" for name, n in inclusive.most_common(80)]
            lines += ["", "leaf:"] + [f"{n / max(1, busy):6.1%}  {name}" for name, n in leaf.most_common(40)]
            lines += ["", "importing:"] + [f"{n / max(1, busy):6.1%}  {name}" for name, n in imports.most_common(30)]
            out.write_text("\n".join(lines) + "\n")


def main() -> None:
    out = Path(sys.argv[1])
    threading.Thread(target=_sample, args=(out,), daemon=True, name="profiler").start()
    if sys.argv[2] == "-m":
        module = sys.argv[3]
        sys.argv = [module, *sys.argv[4:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = sys.argv[2]
        sys.argv = sys.argv[2:]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Runs a command-line script's main() after importing it and prints, as the last line of stdout, the CPU seconds
(user + system, threads and reaped worker processes included) spent importing it and running it:

    python bench/split_cpu.py SCRIPT [ARGS...]  ->  {"import_cpu": 5.1, "run_cpu": 0.6}

The script is imported under a module name of its own (not __main__), so its `if __name__ == "__main__"` block does
not run and worker processes can unpickle its functions; then main() runs with sys.argv = [SCRIPT, ARGS...]. This
separates a tool's fixed start-up (interpreter, imports) from the work that grows with the corpus.
"""
import importlib.util
import json
import resource
import sys


def cpu() -> float:
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    script = sys.argv[1]
    start = cpu()
    spec = importlib.util.spec_from_file_location("measured_tool", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["measured_tool"] = module
    sys.argv = sys.argv[1:]
    spec.loader.exec_module(module)
    imported = cpu()
    code = module.main()
    sys.stdout.flush()
    print(json.dumps({"import_cpu": imported - start, "run_cpu": cpu() - imported}))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

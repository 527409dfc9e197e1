"""A sweep: one task run over a grid of parameters, each trial reporting a `loss` metric.

Every trial gets its parameters as environment variables (`$x`, `$y`; non-string values as
JSON) and reports metrics by appending JSON lines to `$DSTACK_METRICS_FILE`. Here the "loss"
is computed by awk from the parameters: (x - 1)^2 + (y - 1)^2, lowest at x=1, y=1.

Run with: python examples/sweep.py
"""

from typing import Any, Dict, List

from dstack.api import Client, Task


def main() -> None:
    client = Client.from_config()
    task = Task(
        name="sweep-example",
        commands=[
            'echo "trial $DSTACK_SWEEP_INDEX/$DSTACK_SWEEP_SIZE: x=$x y=$y"',
            "awk -v x=\"$x\" -v y=\"$y\" "
            "'BEGIN { printf \"{\\\"loss\\\": %g}\\n\", (x - 1) * (x - 1) + (y - 1) * (y - 1) }' "
            '>> "$DSTACK_METRICS_FILE"',
        ],
    )
    sweep = client.runs.sweep(task, {"x": [-1, 0, 1, 2], "y": [0, 1]}, max_parallel=2)
    sweep.wait()

    results: List[Dict[str, Any]] = sweep.results()
    for row in results:
        print(row)
    best = sweep.best("loss")
    print("best:", best)

    assert all(row["status"] == "done" for row in results), results
    assert best is not None and (best["x"], best["y"]) == (1, 1), best


if __name__ == "__main__":
    main()

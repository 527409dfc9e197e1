"""Writes a small dataset to data/ (the `prepare` workflow)."""
import pathlib

data = pathlib.Path("data")
data.mkdir(exist_ok=True)
(data / "numbers.csv").write_text("x\n" + "\n".join(str(i) for i in range(10)) + "\n")
print("prepared", data / "numbers.csv")

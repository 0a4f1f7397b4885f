"""bench/README.md holds one section per benchmark; each benchmark script rewrites only its own."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"
HEADER = "# Benchmarks\n\nOne section per benchmark; each is rewritten by its script.\n"


def write_section(name, body):
    """Replace the "## <name>" section of bench/README.md with `body` (or append it), leaving the others alone."""
    section = f"## {name}\n\n{body.strip()}\n\n"
    text = README.read_text() if README.is_file() else HEADER
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    README.write_text(text.rstrip("\n") + "\n")

"""Print the configuration reference (markdown) from the config tree; docs/configuration.md embeds its output.

  python tools/config_reference.py            print it
  python tools/config_reference.py --update   rewrite docs/configuration.md between its markers
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megamoe import cli
from megamoe.config.reference import markdown

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--update", action="store_true", help=f"rewrite docs/{REFERENCE.name} between the markers")
    args = parser.parse_args(argv)
    if not args.update:
        print(markdown())
        return 0
    text = REFERENCE.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    REFERENCE.write_text(f"{head}{BEGIN}\n{markdown()}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate lyra/data/assets/simplified_only.txt, the Simplified-only character table of lyra.data.zh_tw.

    pip download --no-deps --no-binary :all: OpenCC==1.4.2 -d /tmp/opencc
    python scripts/build_zh_tw_table.py /tmp/opencc/opencc-1.4.2.tar.gz

OpenCC's wheels ship compiled .ocd2 dictionaries only, so the text table STCharacters.txt is read from
its source distribution, once, here; lyra ships the derived table. A character is Simplified-only when
STCharacters lists it and none of its Traditional candidates, nor their Taiwan forms (OpenCC t2tw,
through the installed wheel's API), is the character itself.
"""

from __future__ import annotations

import argparse
import re
import tarfile
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "lyra" / "data" / "assets" / "simplified_only.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="an OpenCC source distribution (.tar.gz)")
    args = parser.parse_args()
    version = re.search(r"opencc-([\d.]+)\.tar\.gz$", args.sdist.name, re.I)
    with tarfile.open(args.sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("data/dictionary/STCharacters.txt"))
        table = archive.extractfile(member).read().decode("utf-8")

    import opencc

    to_taiwan = opencc.OpenCC("t2tw.json")
    simplified = []
    for line in table.splitlines():
        if line.startswith("#"):  # the table's own header and notes
            continue
        source, _, candidates = line.partition("\t")
        traditional = set(candidates.split())
        if source and source not in traditional | {to_taiwan.convert(char) for char in traditional}:
            simplified.append(source)
    header = (f"# Simplified-only characters, derived from OpenCC {version.group(1) if version else '?'} "
              "data/dictionary/STCharacters.txt (Apache-2.0) by scripts/build_zh_tw_table.py\n")
    OUTPUT.write_text(header + "".join(sorted(set(simplified))) + "\n", encoding="utf-8")
    print(f"{OUTPUT}: {len(set(simplified))} characters")


if __name__ == "__main__":
    main()

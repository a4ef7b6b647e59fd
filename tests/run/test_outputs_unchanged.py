"""Every bundled filter gives the same subset bytes as before the package restructuring.

``filter_outputs.json`` was recorded by ``filter_outputs.py`` run against commit db8c791 (the flat
package that matched DataComp byte for byte); this recomputes the table with today's code on
the same three pools (bundled example, generated with cluster set and text features, TiC).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.run.filter_outputs import FILTERS, SINCE_RECORDING, TIC_FILTERS, all_outputs

EXPECTED = json.loads((Path(__file__).with_name("filter_outputs.json")).read_text())


def test_expected_table_covers_every_bundled_filter():
    names = {k.split("/", 1)[1] for k in EXPECTED}
    assert {f.stem for f in FILTERS} - SINCE_RECORDING <= names
    assert {f.stem for f in TIC_FILTERS} - SINCE_RECORDING <= names
    assert len(EXPECTED) == 24


def test_every_filter_output_is_byte_identical_to_before(tmp_path):
    got = all_outputs(tmp_path / "w")
    changed = sorted(k for k in EXPECTED if got.get(k) != EXPECTED[k])
    assert got.keys() == EXPECTED.keys()
    assert not changed, f"subset bytes changed for {changed}"

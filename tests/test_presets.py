"""The presets table lists every preset, and WeTok's counts are the released models'."""

from vistok import presets


def test_table_lists_every_preset_with_reference_counts():
    rows = {(r[0], r[1]): r for r in presets.rows()}
    for family, (names, _) in {**presets.TOKENIZERS, **presets.GENERATORS}.items():
        assert {(family, n) for n in names} <= rows.keys()
    for ratio in ("compratio24", "compratio48", "compratio192", "compratio768"):
        row = rows[("WeTok", ratio)]
        assert row[3].startswith(row[2] + " ")  # params == released count (to 10k)
    assert rows[("WeTok", "compratio192")][4:] == ["256", "32 (4x8)", "192"]
    assert rows[("GPT", "B")][2] == "110.89"  # LlamaGen GPT-B with a 16384 codebook: 110.9M

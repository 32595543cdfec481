from metering.metrics import Family, parse, render


def test_render_then_parse_round_trips():
    text = render(
        [
            Family.one("a_total", "counter", "As.", 3),
            Family.by("b_total", "counter", "Bs by reason.", "reason", {"z": 1, 'say "hi"\n': 2.5}),
            Family.one("c", "gauge", "C.", -1.25),
        ]
    )
    assert text.endswith("\n")
    assert "# HELP a_total As.\n# TYPE a_total counter\na_total 3\n" in text
    assert 'b_total{reason="say \\"hi\\"\\n"} 2.5' in text  # label values escaped
    assert parse(text) == {
        "a_total": 3,
        'b_total{reason="say \\"hi\\"\\n"}': 2.5,
        'b_total{reason="z"}': 1,
        "c": -1.25,
    }


def test_an_empty_labelled_family_is_just_its_header():
    assert render([Family.by("d_total", "counter", "Ds.", "reason", {})]) == (
        "# HELP d_total Ds.\n# TYPE d_total counter\n"
    )

"""transfer/benchmark/paper.py and the shipped paper_numbers.yaml: it loads, validates, and holds the paper's numbers."""
import pytest

from transfer.benchmark.paper import METRICS, load_paper_numbers, paper_cells


@pytest.fixture(scope="module")
def numbers():
    return load_paper_numbers()


def test_shipped_file_loads_and_validates(numbers):
    assert len(numbers) == 152
    tables = {k.split("/")[0] for k in numbers}
    assert tables == {f"table{i}" for i in range(1, 8)}  # figures 5, 6, 9 print their values only in the images
    for key, entry in numbers.items():
        assert isinstance(entry["source"], str) and isinstance(entry["row"], str)
        assert paper_cells(key, numbers), key  # every row has at least one metric
        assert set(paper_cells(key, numbers)) <= set(METRICS)


# Retyped from the paper's tables, so a mistyped copy in the yaml fails here.
@pytest.mark.parametrize("key,metric,value", [
    ("table1/r50/r18/disco", "linear_top1", 60.6),
    ("table1/r50/r18/disco", "linear_top5", 83.7),
    ("table1/r152/effb1/disco", "linear_top5", 91.2),
    ("table1/r101/mobv3l/seed", "linear_top1", 59.9),
    ("table1/none/r101/moco_v2", "linear_top1", 69.1),
    ("table2/r50/r34/kd_disco", "linear_top1", 65.9),
    ("table2/r50/mobv3l/rkd", "linear_top1", 36.9),
    ("table3/r50/r34/disco", "voc_ap", 56.5),
    ("table3/r152/r34/seed", "voc_ap75", 59.9),
    ("table3/r101/r34/disco", "coco_mask_ap75", 37.4),
    ("table4/r50/r18/disco_hidden512", "linear_top1", 57.1),
    ("table4/r50/mobv3l/disco_hidden1280", "linear_top1", 63.8),
    ("table5/swav_r50/mobv3l/swav_disco", "linear_top1", 55.7),
    ("table6/dino_xcits12/xcit_tiny/dino_disco", "linear_top1", 71.1),
    ("table6/none/vit_tiny/dino", "linear_top1", 55),
    ("table7/selav2_r50/effb0/disco", "linear_top1", 62.2),
    ("table7/none/r50/swav", "linear_top1", 75.3),
])
def test_spot_checks_against_the_paper(numbers, key, metric, value):
    assert paper_cells(key, numbers)[metric] == value


def test_rows_without_a_printed_cell_leave_it_out(numbers):
    assert paper_cells("table1/none/mobv3l/supervised", numbers) == {"linear_top1": 75.2}  # T-5 printed as "-"
    assert set(paper_cells("table3/none/r34/moco_v2", numbers)) == set(METRICS[9:])


def _write(tmp_path, text):
    p = tmp_path / "numbers.yaml"
    p.write_text(text)
    return str(p)


GOOD = 'table1/r50/r18/disco:\n  source: "Table 1"\n  row: "R-50 -> R-18, DisCo"\n  linear_top1: 60.6\n'


@pytest.mark.parametrize("text,needle", [
    (GOOD.replace("table1/r50/r18/disco", "table1/r50/disco"), "table1/r50/disco"),
    (GOOD.replace("linear_top1", "linear_top_1"), "linear_top_1"),
    (GOOD.replace("60.6", '"60.6"'), "linear_top1"),
    (GOOD.replace("60.6", "true"), "linear_top1"),
    (GOOD.replace('  row: "R-50 -> R-18, DisCo"\n', ""), "row"),
])
def test_malformed_file_names_key_and_field(tmp_path, text, needle):
    with pytest.raises(ValueError) as e:
        load_paper_numbers(_write(tmp_path, text))
    assert needle in str(e.value)
    assert "table1/r50" in str(e.value)


def test_good_tmp_file_loads(tmp_path):
    assert paper_cells("table1/r50/r18/disco", load_paper_numbers(_write(tmp_path, GOOD))) == {"linear_top1": 60.6}


def test_unknown_key_names_close_keys(numbers):
    assert paper_cells("", numbers) == {}
    with pytest.raises(ValueError) as e:
        paper_cells("table1/r50/r18/disko", numbers)
    msg = str(e.value)
    assert "table1/r50/r18/disko" in msg and "table1/r50/r18/disco" in msg
    assert len(msg.split("closest: ")[1].split(", ")) == 5

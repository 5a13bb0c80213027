"""GPU checks (skipped without CUDA): the same pipeline on the GPU agrees with the CPU float32 reference."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from annotator.cli import app
from tests.conftest import read_output, write_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
runner = CliRunner()


# float32 on the GPU may use TF32 convolutions (the patch embedding); bfloat16 keeps ~3 significant digits.
@pytest.mark.parametrize(("dtype", "mean_abs_diff"), [("float32", 2e-3), ("bfloat16", 0.05)])
def test_gpu_run_matches_cpu_float32(tmp_path, mixed_parquet, dtype, mean_abs_diff):
    outputs = {}
    for device, run_dtype in [("cpu", "float32"), ("cuda", dtype)]:
        out = tmp_path / device
        recipe = write_recipe(
            tmp_path / f"{device}.yaml", mixed_parquet, out, model={"device": device, "dtype": run_dtype}
        )
        result = runner.invoke(app, ["run", str(recipe), "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs[device] = np.array(read_output(out).column("prob").to_pylist(), dtype=np.float64)
    assert np.abs(outputs["cuda"] - outputs["cpu"]).mean() < mean_abs_diff

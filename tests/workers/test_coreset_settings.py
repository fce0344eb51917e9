"""The coreset settings of Q-MUL's retain pass: an admin's per-model override, Q-MUL's only, off
unless set."""

import pytest
from pydantic import ValidationError

from service.core.models import Model
from service.core.settings import Settings, UnlearnSettings
from workers.batches.run import unlearn_config


def test_coreset_settings_reach_qmuls_config_and_are_off_by_default(tmp_path):
    settings = Settings(data_dir=tmp_path)
    method, config = unlearn_config(settings, Model(name="m", unlearn_config=None))
    assert method == "qmul" and config.retain_coreset is None
    override = UnlearnSettings(retain_coreset=0.3, coreset_selector="jscds").model_dump(exclude_none=True)
    method, config = unlearn_config(settings, Model(name="m", unlearn_config=override))
    assert (config.retain_coreset, config.coreset_selector) == (0.3, "jscds")


@pytest.mark.parametrize("values", [{"retain_coreset": 0.0}, {"retain_coreset": 1.5}, {"coreset_selector": "kmeans"},
                                    {"method": "ft", "retain_coreset": 0.2}])
def test_coreset_settings_are_checked(values):
    with pytest.raises(ValidationError):
        UnlearnSettings(**values)

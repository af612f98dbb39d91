"""Values from a form (the console's) are checked by the service before use: an unknown
StoppedMode is InvalidParameter, not a ValueError (a 500)."""

from __future__ import annotations

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Image
from ecsnap.service import instances
from ecsnap.service.context import ServiceContext
from tests.conftest import ACCOUNT, REGION


@pytest.mark.parametrize("mode", ["Bogus", "Not-applicable", "keepcharging"])
def test_an_unknown_stopped_mode_is_invalid_parameter(ctx: ServiceContext, image: Image,
                                                     mode: str) -> None:
    req = instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano")
    [instance_id] = instances.run_instances(ctx, ACCOUNT, REGION, req)
    with pytest.raises(EcsError) as refused:
        instances.stop_instance(ctx, ACCOUNT, instance_id, stopped_mode=mode)
    assert (refused.value.code, refused.value.http_status) == ("InvalidParameter", 400)
    assert instances.statuses(ctx, ACCOUNT, [instance_id])[instance_id] == "Running"

"""Ray Serve's own schema on this project's Serve configs (runs in ``.venvs/ray``).

``ray_config_check.py SERVE_YAML RAYSERVICE_YAML``: validates deploy/ray/serve.yaml and the
RayService's embedded ``serveConfigV2`` with ``ServeDeploySchema`` (what ``serve run`` and
KubeRay do with them), and builds the application from its ``import_path`` and ``args`` as Serve
does (without a cluster). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from tokenreward_service.ray_serve import DEFAULT_OPTIONS, DEPLOYMENT


def main() -> None:
    serve_yaml, rayservice_yaml = (Path(arg) for arg in sys.argv[1:3])
    (rayservice,) = [d for d in yaml.safe_load_all(rayservice_yaml.read_text()) if d]
    configs = [
        yaml.safe_load(serve_yaml.read_text()),
        yaml.safe_load(rayservice["spec"]["serveConfigV2"]),
    ]
    valid = 0
    for config in configs:
        schema = ServeDeploySchema.model_validate(config)
        valid += 1
        for application in schema.applications:
            app = call_user_app_builder_with_args_if_necessary(
                import_attr(application.import_path), application.args
            )
            deployment = app._bound_deployment
            assert deployment.name == DEPLOYMENT, deployment.name
            assert deployment.max_ongoing_requests == DEFAULT_OPTIONS["max_ongoing_requests"]
            assert [d.name for d in application.deployments] == [DEPLOYMENT]
    print(json.dumps({"valid": valid, "deployment_options": "ok"}))


if __name__ == "__main__":
    main()

"""Every deployment in prefect.yaml loads, and its default parameters are valid (smoke)."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema

from deployments.catalog import load_catalog, to_runner_deployment

CATALOG = load_catalog()


def test_catalog_is_not_empty_and_names_are_unique():
    names = [spec.name for spec in CATALOG]
    assert "health-check" in names
    assert len(names) == len(set(names))


def with_required_examples(spec):
    """The yaml's parameters, plus each required parameter's first `examples` value: a
    parameter with no sensible default (a version, a replica count) must show an example."""
    schema = parameter_schema(spec.load_flow().fn).model_dump_for_openapi()
    parameters = dict(spec.parameters)
    for name in schema.get("required", []):
        if name not in parameters:
            examples = schema["properties"][name].get("examples")
            assert examples, f"{spec.name}: required parameter {name!r} has no example"
            parameters[name] = examples[0]
    return parameters


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_entrypoint_loads_and_default_parameters_validate(spec):
    flow = spec.load_flow()
    flow.validate_parameters(with_required_examples(spec))
    deployment = to_runner_deployment(spec)
    assert deployment.name == spec.name
    assert deployment.entrypoint == spec.entrypoint


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_every_form_field_is_described(spec):
    schema = parameter_schema(spec.load_flow().fn).model_dump_for_openapi()
    definitions = schema.get("definitions", {})

    def undocumented(properties, where):
        for name, prop in properties.items():
            if "$ref" in prop or "allOf" in prop:
                ref = (prop.get("$ref") or prop["allOf"][0]["$ref"]).split("/")[-1]
                yield from undocumented(definitions[ref].get("properties", {}), f"{where}{name}.")
            elif not prop.get("description"):
                yield f"{where}{name}"

    assert list(undocumented(schema["properties"], "")) == []


def test_periodic_runbooks_are_scheduled():
    schedules = {spec.name: spec.schedules for spec in CATALOG}
    assert schedules["health-check"][0]["cron"] == "*/5 * * * *"
    assert schedules["secret-rotation"][0]["interval"] == 30 * 24 * 3600


# Runbooks a person starts that can pause for an approval: each takes `requested_by`, so
# four eyes hold even where no authenticating proxy names the requester.
# (incident-response and the diagnoses are started by alerts: there is no requester.)
APPROVING_RUNBOOKS = (
    "autoscale",
    "backup",
    "cert-renewal",
    "deploy",
    "drop-pre-restore-databases",
    "maintenance-window",
    "migrations",
    "restore",
    "rollback",
    "scale",
    "secret-rotation",
)


@pytest.mark.parametrize("name", APPROVING_RUNBOOKS)
def test_runbooks_that_ask_for_approval_take_the_requester(name):
    (spec,) = [s for s in CATALOG if s.name == name]
    properties = parameter_schema(spec.load_flow().fn).model_dump_for_openapi()["properties"]
    assert "cannot approve" in properties["requested_by"]["description"]

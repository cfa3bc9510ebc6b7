"""The table of operations (app/operations.py) against the functions the migrations really create
(pg_proc): every name, argument, type and result shape declared there is the function's own, and every
function of the schema is either an operation or one of the few helpers the functions use."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from app import operations as ops
from app.models import CollectionRunResponse
from app.operations import OPERATIONS, Operation, Shape

# Functions of the schema that no client calls: the schema's own helpers and triggers.
HELPERS = frozenset(
    {
        "collection_category_ids_valid",  # a CHECK constraint of collection_runs
        "collection_runs_total",  # the estimated total of a long listing
        "collection_rate_per_s",  # the rate a limit allows now
        "collection_held_unit",  # the lease check inside every write about a unit of work
        "collection_free_units",  # dead processes' units back (heartbeat, release)
        "collection_pause_for_budget",  # a run that cannot afford its next unit
        "collection_complete_if_done",  # a run with nothing left to do
        "collection_fail_unheld",  # a run that fails by its own rule
    }
)

FUNCTIONS = """
select p.proname as name,
       p.proretset as returns_set,
       format_type(p.prorettype, null) as returns,
       t.typtype::text as return_kind,
       t.typrelid as return_relation,
       coalesce(p.proargnames, '{}') as arg_names,
       coalesce(p.proargmodes::text[], '{}') as arg_modes,
       array(select format_type(a, null) from unnest(p.proargtypes) a) as in_types,
       coalesce(array(select format_type(a, null) from unnest(p.proallargtypes) a), '{}') as all_types
  from pg_proc p
  join pg_namespace n on n.oid = p.pronamespace
  join pg_type t on t.oid = p.prorettype
 where n.nspname = 'public'
"""


@pytest.fixture(scope="module")
async def functions(migrated_dsn: str) -> dict[str, list[dict[str, Any]]]:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        found: dict[str, list[dict[str, Any]]] = {}
        for row in await conn.fetch(FUNCTIONS):
            info = dict(row)
            if info["return_relation"]:
                info["columns"] = [
                    r["attname"]
                    for r in await conn.fetch(
                        "select attname from pg_attribute where attrelid = $1 and attnum > 0 "
                        "and not attisdropped order by attnum",
                        info["return_relation"],
                    )
                ]
            else:
                modes = info["arg_modes"]
                info["columns"] = [
                    n for n, m in zip(info["arg_names"], modes, strict=False) if m in ("t", "o")
                ]
            found.setdefault(info["name"], []).append(info)
        return found
    finally:
        await conn.close()


def only(functions: dict[str, list[dict[str, Any]]], operation: Operation[Any]) -> dict[str, Any]:
    candidates = functions.get(operation.function, [])
    assert len(candidates) == 1, f"{operation.function}: {len(candidates)} functions of that name"
    return candidates[0]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.function)
class TestEveryOperation:
    def test_arguments_are_the_functions_own_names_and_types_in_order(
        self, functions: dict[str, list[dict[str, Any]]], operation: Operation[Any]
    ) -> None:
        function = only(functions, operation)
        modes = function["arg_modes"] or ["i"] * len(function["in_types"])
        names = [n for n, m in zip(function["arg_names"], modes, strict=False) if m in ("i", "b")]
        assert names == [f"p_{name}" for name in operation.args]
        assert function["in_types"] == list(operation.args.values())

    def test_the_result_has_the_declared_shape(
        self, functions: dict[str, list[dict[str, Any]]], operation: Operation[Any]
    ) -> None:
        function = only(functions, operation)
        if operation.shape is Shape.VALUE:
            assert isinstance(operation, ops.Value)
            assert not function["returns_set"]
            assert function["returns"] == operation.returns
            return
        # Rows: a composite (one for ONE; a set for MAYBE and ROWS) or a TABLE.
        assert function["returns_set"] is (operation.shape is not Shape.ONE)
        assert function["return_kind"] == "c" or function["returns"] == "record"


@pytest.mark.parametrize(
    "operation", [op for op in OPERATIONS if op.shape is not Shape.VALUE], ids=lambda op: op.function
)
def test_every_field_of_a_row_model_is_a_column_of_the_result(
    functions: dict[str, list[dict[str, Any]]], operation: Operation[Any]
) -> None:
    model = getattr(operation, "model")  # noqa: B009
    columns = only(functions, operation)["columns"]
    assert set(model.model_fields) <= set(columns), set(model.model_fields) - set(columns)


def test_every_function_of_the_schema_is_an_operation_or_a_helper(
    functions: dict[str, list[dict[str, Any]]],
) -> None:
    declared = {operation.function for operation in OPERATIONS}
    callable_ = {
        name
        for name, candidates in functions.items()
        if name.startswith("collection_") and all(c["returns"] != "trigger" for c in candidates)
    }
    assert callable_ - HELPERS == declared
    assert len(declared) == len(OPERATIONS), "two operations call one function"


class TestBinding:
    def test_arguments_are_bound_by_name_in_the_functions_order(self) -> None:
        # Two integers side by side, given the other way round: each lands on its own name.
        create = ops.One(
            "f",
            CollectionRunResponse,
            {"org_id": "uuid", "estimated_cost_cents": "bigint", "total_items": "integer"},
        )
        org = uuid.uuid4()
        bound = create.bind(None, {"total_items": 50, "estimated_cost_cents": 500, "org_id": org})
        assert list(bound.items()) == [
            ("p_org_id", org),
            ("p_estimated_cost_cents", 500),
            ("p_total_items", 50),
        ]
        assert create.sql == (
            "select * from public.f(p_org_id => $1, p_estimated_cost_cents => $2, p_total_items => $3)"
        )
        assert ops.Value("g", int, {"limit": "integer"}, "integer").sql == "select public.g(p_limit => $1)"

    @pytest.mark.parametrize(
        ("given", "message"),
        [
            ({"org_id": uuid.uuid4()}, "argument run_id not given"),
            ({"org_id": uuid.uuid4(), "run_id": uuid.uuid4(), "extra": 1}, "takes no argument extra"),
            ({"org_id": str(uuid.uuid4()), "run_id": uuid.uuid4()}, "org_id must be uuid, got str"),
        ],
    )
    def test_a_wrong_call_is_a_type_error_before_anything_is_sent(
        self, given: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(TypeError, match=message):
            ops.GET_RUN.bind(None, given)

    def test_a_boolean_is_not_an_integer(self) -> None:
        with pytest.raises(TypeError, match="limit must be integer, got bool"):
            ops.INCOMPLETE_RUNS.bind(None, {"limit": True})

    def test_missing_arguments_come_from_a_models_fields_of_the_same_name(self) -> None:
        from app.models import CollectionSettingsUpdate

        org = uuid.uuid4()
        bound = ops.UPDATE_SETTINGS.bind(CollectionSettingsUpdate(max_concurrent_runs=7), {"org_id": org})
        assert bound == {
            "p_org_id": org,
            "p_budget_cap_cents": None,  # left out: the function keeps the stored value
            "p_soft_warning_percent": None,
            "p_max_concurrent_runs": 7,
            "p_rate_weight": None,
        }

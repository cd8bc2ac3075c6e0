"""Role assignment: fill each sample's `roles` column from the recipe's role conditions.

The engine appends `RoleAssignment` as the last per-sample step of a run when the recipe has a
`roles:` section (engine/run.py). A sample gets every role whose condition it meets, in recipe
order; the column is replaced, not extended. A sample that meets none keeps an empty list, or,
with `roles_required: true`, is dropped with reason `no_role`.
"""

from __future__ import annotations

import pyarrow as pa

from curate import schema
from curate.roles.expression import Condition, ExpressionError, compile_condition
from curate.roles.fields import BatchFields
from curate.roles.spec import RoleSpec
from curate.stage import Params, RecipeError, Stage, StageContext, with_drops

ROLE_STAGE = "roles"  # the step's name in the funnel and the drop log
ROLE_PHASE = "roles"  # its phase when the recipe has no stage to join
TARGET = "curate.roles.assign:RoleAssignment"
NO_ROLE = "no_role"


def compile_roles(roles: dict[str, RoleSpec], file: str | None = None) -> dict[str, Condition]:
    """Compile every role's condition; a bad one is a RecipeError naming `roles.<name>.when`."""
    conditions = {}
    for name, spec in roles.items():
        try:
            conditions[name] = compile_condition(spec.when)
        except ExpressionError as error:
            raise RecipeError(str(error), path=f"roles.{name}.when", file=file) from None
    return conditions


class RoleRouter:
    """Decides the roles of the samples of a batch."""

    def __init__(self, roles: dict[str, RoleSpec]):
        self.roles = roles
        self.conditions = compile_roles(roles)

    def route(self, table: pa.Table) -> list[list[str]]:
        """Per row, the names of the roles whose condition it meets, in recipe order."""
        fields = BatchFields(table)
        result: list[list[str]] = [[] for _ in range(table.num_rows)]
        for name, condition in self.conditions.items():
            rows = fields.rows(sorted(condition.fields), tuple(self.roles[name].captions))
            for index, values in enumerate(rows):
                if condition(values):
                    result[index].append(name)
        return result


class RoleAssignmentParams(Params):
    """The recipe's roles and whether a sample needs one to be kept."""

    roles: dict[str, RoleSpec]
    required: bool = False


class RoleAssignment(Stage):
    """Writes the `roles` column (`annotate`); drops role-less samples (`no_role`) when roles are required
    (`select`)."""

    name = ROLE_STAGE
    Params = RoleAssignmentParams
    phase = ROLE_PHASE  # the engine sets it to the phase the step joins
    reads = frozenset({"kind", "scores", "captions", "image_meta", "source", "meta"})  # the condition fields
    provides = frozenset({"roles"})
    reads_images = False
    annotation_params = frozenset({"roles"})
    selection_params = frozenset({"required"})

    def __init__(self, params: RoleAssignmentParams, context: StageContext | None = None):
        super().__init__(params, context)
        self.router = RoleRouter(params.roles)

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Return `batch` with each sample's roles (those whose condition it meets, in recipe order)."""
        roles = self.router.route(batch)
        field = schema.SAMPLE_SCHEMA.field("roles")
        return batch.set_column(batch.schema.get_field_index("roles"), field, pa.array(roles, field.type))

    def select(self, batch: pa.Table) -> pa.Table:
        """With `required`, drop the samples that have no role."""
        if not self.params.required:
            return batch
        names = ", ".join(self.params.roles)
        roles = batch.column("roles").to_pylist()
        reasons = [None if assigned else NO_ROLE for assigned in roles]
        details = [None if assigned else f"meets none of the roles: {names}" for assigned in roles]
        return with_drops(batch, reasons, details)

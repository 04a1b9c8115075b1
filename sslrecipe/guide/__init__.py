"""The advisor: the survey's evidence as data, constraints -> ranked SSL strategies, a runnable recipe.

    from sslrecipe.guide import advise, write_recipe
    advice = advise(backbone="resnet", shots=25)      # or advise(Constraints(...))
    advice.best.method, advice.best.init, advice.as_json()
    write_recipe(advice, "advised.yaml")

Data: `evidence.yaml` (Tables III, IV, VI, VII), `rules.yaml` (the decision table, docs/advisor.md).
"""

from sslrecipe.guide.advisor import Advice, Option, advise
from sslrecipe.guide.constraints import Constraints, constraints_from_json, resolve
from sslrecipe.guide.evidence import load_evidence
from sslrecipe.guide.write import recipe_yaml, write_recipe

__all__ = [
    "Advice", "Option", "Constraints", "advise", "resolve", "constraints_from_json", "load_evidence",
    "recipe_yaml", "write_recipe",
]

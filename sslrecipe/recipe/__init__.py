"""Recipe schema and loading (`load_recipe`, `Recipe`)."""

from sslrecipe.recipe.loader import apply_overrides, deep_merge, load_recipe, recipe_from_dict, recipe_to_yaml
from sslrecipe.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "recipe_to_yaml", "recipe_from_dict", "deep_merge", "apply_overrides"]

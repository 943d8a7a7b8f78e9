"""`dpo-dist profiles` and `dpo-dist templates`: what ships."""
from __future__ import annotations

def _profiles(args) -> int:
    if args.recipes:
        return _recipes()
    from dpo_dist.config.profiles import load_profile, profile_names

    print(f"{'profile':<28}{'launcher':<12}{'backend':<11}{'procs':>6}  {'precision':<10}{'micro':>6}  methods")
    for name in profile_names():
        p = load_profile(name)
        print(f"{name:<28}{p.launcher:<12}{p.backend:<11}{p.world_size:>6}  {p.precision or 'recipe':<10}"
              f"{p.micro_batch_size:>6}  {','.join(p.methods)}")
    return 0


def _templates(args) -> int:
    from dpo_dist.data.templates import get_template, template_names

    for name in template_names():
        t = get_template(name)
        print(f"{name:<10} end-of-turn {t.end_of_turn or '<eos>':<16} default system: {t.default_system or '-'}")
    return 0


def _recipes() -> int:
    from dpo_dist.config.resources import RECIPES, shipped_names

    for name in shipped_names(RECIPES):
        print(name)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("profiles", help="list the shipped launch profiles (--recipes: the shipped recipes)")
    p.add_argument("--recipes", action="store_true", help="list the shipped recipes instead; pass one by name "
                   "to any command that takes a recipe, or copy it with `dpo-dist init`")
    p.set_defaults(func=_profiles)

    p = sub.add_parser("templates", help="list the chat templates")
    p.set_defaults(func=_templates)

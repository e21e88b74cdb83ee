"""The benchmark cases of `gpubp bench` (one TOML file each). The wheel ships this folder
as the package `gpubp.bench_cases` (see pyproject.toml), so an installed gpubp finds them."""

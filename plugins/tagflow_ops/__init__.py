"""tagflow's Airflow operators: thin bindings of templated config to `tagflow` functions (include/tagflow)."""

"""The router process: admission, dependency graphs, dispatch, state, queries."""

"""Agentic task synthesis (spec §5): code environments mined from git history, general-agent
environments with verifiers, and verified search QA, each filtered by solvability."""

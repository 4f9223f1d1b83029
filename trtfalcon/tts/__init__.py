"""Test-time scaling: DeepConf's confidence and votes (deepconf.py, vote.py, answers.py) and the project's small
trained reasoning model with its toy task (toy_task.py, toy_train.py, toy_eval.py)."""

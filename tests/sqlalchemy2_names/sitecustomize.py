"""Put on PYTHONPATH of an `mlflow server` process only (tests/test_mlflow.py, scripts/screenshot_mlflow.sh).

`.[dev]` installs the `optuna` extra, which pins SQLAlchemy below 2 (optuna 2.x's storage fails under 2), and
`mlflow`, whose tracking client works with 1.4 but whose server (3.17) annotates functions with names only
SQLAlchemy 2 exports at its top level: `mlflow server` stops at import with "module 'sqlalchemy' has no attribute
'Engine'". These are the same classes under their 1.4 homes; with SQLAlchemy 2 this file changes nothing.
"""

import sqlalchemy
import sqlalchemy.engine
import sqlalchemy.sql.expression

for _name, _value in {"Engine": sqlalchemy.engine.Engine, "Connection": sqlalchemy.engine.Connection,
                      "ColumnElement": sqlalchemy.sql.expression.ColumnElement}.items():
    if not hasattr(sqlalchemy, _name):
        setattr(sqlalchemy, _name, _value)

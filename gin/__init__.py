"""gin configuration files shipped with stmoe (installed as the package `stmoe.gin`)."""

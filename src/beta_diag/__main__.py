from beta_diag.cli import main

main()

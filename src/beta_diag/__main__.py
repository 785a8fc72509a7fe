from beta_diag.entry import main

main()

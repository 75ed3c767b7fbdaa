from blip2.demo.recipe.driver import main

main()

if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 900,560 } else { set terminal png size 900,560 }
set termoption noenhanced
set output 'results/addition_lambda.png'
datafile = 'results/plots/addition_lambda.dat'
set title 'Addition: theta_pre + lambda*sum(tau) (validation, normalized accuracy)'
set xlabel 'lambda'
set ylabel 'normalized accuracy'
set key bottom right
set grid
plot datafile using 1:2 with linespoints title 'pairs (mean)', '' using 1:3 with linespoints title 'all tasks'

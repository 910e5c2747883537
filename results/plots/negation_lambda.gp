if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 900,560 } else { set terminal png size 900,560 }
set termoption noenhanced
set output 'results/negation_lambda.png'
datafile = 'results/plots/negation_lambda.dat'
set title 'Negation: theta_pre - lambda*tau (validation, mean over tasks and seeds)'
set xlabel 'lambda'
set ylabel 'accuracy'
set yrange [0:1]
set key bottom left
set grid
plot datafile using 1:2 with linespoints title 'target task', '' using 1:3 with linespoints title 'control (Fashion-MNIST)'
